"""Path patching (Wang et al. 2022) against plain TransformerLens hooks and F.layer_norm.

With every other head and MLP frozen to the base run, a sender head's path to a receiver is its
output change ``(z_src - z_base) @ W_O`` added to the stream the receiver reads: the read-out's
``ln_final`` input, or the LayerNorm'd input of the receivers' queries/keys (other heads of the
receiving layer untouched). The reference writes that out by hand; it uses no circuitkd executor.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from circuitkd import ModelSpec, build_model
from circuitkd.patching import path_patch
from tests.hand_reference import logit_diff_at_cls, random_pairs

torch.set_num_threads(1)

N, P, V = 5, 8, 30


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return build_model(ModelSpec(backbone="native", n_layers=3, d_model=32, n_heads=2, d_vocab=V, n_ctx=P,
                                 n_classes=3), device="cpu")


def _pairs():
    return random_pairs(N, P, V, padding={0: 2})


_ld = logit_diff_at_cls


def _setup(model, pairs, direction):
    base, src = (pairs.corrupt, pairs.clean) if direction == "denoise" else (pairs.clean, pairs.corrupt)
    names = [f"blocks.{l}.attn.hook_z" for l in range(3)] + [f"blocks.{l}.hook_resid_pre" for l in range(3)]
    with torch.no_grad():
        _, b = model.run_with_cache(base, attention_mask=pairs.attention_mask, names_filter=lambda n: n in names)
        _, s = model.run_with_cache(src, attention_mask=pairs.attention_mask, names_filter=lambda n: n in names)
    out = lambda l, h: (s[f"blocks.{l}.attn.hook_z"][:, :, h] - b[f"blocks.{l}.attn.hook_z"][:, :, h]) \
        @ model.blocks[l].attn.W_O[h]  # noqa: E731
    return base, b, out


def _run(model, base, pairs, hooks):
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return float(_ld(model(base, attention_mask=pairs.attention_mask), pairs).mean())


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_path_to_logits_is_the_hand_direct_effect(model, direction):
    pairs = _pairs()
    base, _, head_out = _setup(model, pairs, direction)
    got = path_patch(model, pairs, "logits", direction=direction, normalise=False)
    m_base = _run(model, base, pairs, [])
    for l in range(3):
        for h in range(2):
            d = head_out(l, h)
            want = _run(model, base, pairs, [("ln_final.hook_in", lambda act, hook, d=d: act + d)])
            assert abs(float(got[l, h]) - want) < 1e-5, (l, h)
    assert (got - m_base).abs().max() > 1e-2


@pytest.mark.parametrize("port", ["q", "k", "v"])
def test_path_through_receiver_heads_is_hand_patched(model, port):
    pairs = _pairs()
    receivers = [(2, 1, port)]
    base, b, head_out = _setup(model, pairs, "denoise")
    got = path_patch(model, pairs, receivers, normalise=False)
    assert got[2].isnan().all()
    ln, attn = model.blocks[2].ln1, model.blocks[2].attn
    W, bias = getattr(attn, f"W_{port.upper()}")[1], getattr(attn, f"b_{port.upper()}")[1]
    vals = []
    for l in range(2):
        for h in range(2):
            x = b["blocks.2.hook_resid_pre"] + head_out(l, h)
            new = F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, model.cfg.eps) @ W + bias

            def put(act, hook, new=new):
                act = act.clone()
                act[:, :, 1] = new
                return act
            want = _run(model, base, pairs, [(f"blocks.2.attn.hook_{port}", put)])
            assert abs(float(got[l, h]) - want) < 1e-5, (l, h)
            vals.append(want)
    assert max(vals) - min(vals) > 1e-3
