"""Attribution patching for every site, both directions, raw and normalised, against plain autograd.

The reference keeps each activation's gradient with ``retain_grad`` in a TransformerLens hook
(``model.hooks``), multiplies it by ``source - base`` activations from ``run_with_cache`` and sums
the axes by hand; it shares no code with :func:`circuitkd.patching.attribution_patch`. A second
test checks the estimate is the first-order term of real patching: on a perturbation scaled by
``eps`` the exact patched metric (plain hooks again) departs from it by O(eps²).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from circuitkd import ModelSpec, build_model
from circuitkd.patching import SITES, attribution_patch
from tests.hand_reference import logit_diff_at_cls, random_pairs

torch.set_num_threads(1)

N, P, V = 5, 8, 30

HOOK = {
    "resid_pre": "blocks.{l}.hook_resid_pre", "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post", "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out", "z": "blocks.{l}.attn.hook_z", "q": "blocks.{l}.attn.hook_q",
    "k": "blocks.{l}.attn.hook_k", "v": "blocks.{l}.attn.hook_v", "pattern": "blocks.{l}.attn.hook_pattern",
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(2)
    return build_model(ModelSpec(backbone="native", n_layers=2, d_model=32, n_heads=2, d_vocab=V, n_ctx=P,
                                 n_classes=3), device="cpu")


def _pairs():
    return random_pairs(N, P, V, padding={0: 2})


_logit_diff = logit_diff_at_cls


def _kl(logits, clean_logits):
    """KL(p_clean || p_run) at the read-out, by torch's kl_div (input = log q, target = log p)."""
    return F.kl_div(logits[:, 0].double().log_softmax(-1), clean_logits[:, 0].double().log_softmax(-1),
                    log_target=True, reduction="none").sum(-1)


def _reduce(contrib, kind, by_pos):
    if kind in ("z", "q", "k", "v"):  # [batch pos head d_head] -> [head pos]
        per = contrib.sum(dim=(0, 3)).T
    elif kind == "pattern":  # [batch head dest src] -> [head dest]
        per = contrib.sum(dim=(0, 3))
    else:  # [batch pos d_model] -> [pos]
        per = contrib.sum(dim=(0, 2))
    return per if by_pos else per.sum(-1)


def _reference(model, pairs, kind, by_pos, direction, metric):
    base, src = (pairs.corrupt, pairs.clean) if direction == "denoise" else (pairs.clean, pairs.corrupt)
    mask = pairs.attention_mask
    names = [HOOK[kind].format(l=l) for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, src_cache = model.run_with_cache(src, attention_mask=mask, names_filter=lambda n: n in names)
        clean_logits = model(pairs.clean, attention_mask=mask)
        fn = (lambda lg: _logit_diff(lg, pairs)) if metric == "logit_diff" else (lambda lg: _kl(lg, clean_logits))
        m_clean = float(fn(clean_logits).mean())
        m_corrupt = float(fn(model(pairs.corrupt, attention_mask=mask)).mean())
    kept = {}

    def keep(name):
        def fn(act, hook):
            act.retain_grad()
            kept[name] = act
            return act
        return fn

    with model.hooks(fwd_hooks=[(n, keep(n)) for n in names]):
        m = fn(model(base, attention_mask=mask))
        m.sum().backward()
    model.zero_grad(set_to_none=True)
    grads = {n: torch.zeros_like(kept[n]) if kept[n].grad is None else kept[n].grad for n in names}
    est = torch.stack([_reduce((grads[n] * (src_cache[n] - kept[n].detach())).double(), kind, by_pos)
                       for n in names]) / N + float(m.detach().mean())
    return est, m_clean, m_corrupt


@pytest.mark.parametrize("metric", ["logit_diff", "kl"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_every_site_equals_hand_autograd(model, direction, metric):
    pairs = _pairs()
    for name, site in sorted(SITES.items()):
        ref, m_clean, m_corrupt = _reference(model, pairs, site.kind, site.by_pos, direction, metric)
        raw = attribution_patch(model, pairs, name, metric, direction=direction, normalise=False)
        norm = attribution_patch(model, pairs, name, metric, direction=direction, normalise=True)
        assert raw.shape == ref.shape, name
        torch.testing.assert_close(raw.double(), ref, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(norm.double(), (ref - m_corrupt) / (m_clean - m_corrupt), atol=1e-4,
                                   rtol=1e-4, msg=name)
        base = m_corrupt if direction == "denoise" else m_clean
        if metric == "kl" and direction == "noise":
            # the clean run is KL's minimum: zero gradient, so the estimate is 0 everywhere
            assert ref.abs().max() < 1e-9 and m_clean == pytest.approx(0.0, abs=1e-9), name
        else:
            # the estimate is not the base metric everywhere (KL is ~0.01 here, a logit difference ~1)
            assert (ref - base).abs().max() > (1e-3 if metric == "logit_diff" else 1e-4), name


def test_estimate_is_the_first_order_term_of_real_patching(model):
    """Patch head z's with base + eps * (source - base): the error of the linear estimate shrinks as eps²."""
    pairs = _pairs()
    mask = pairs.attention_mask
    names = [HOOK["z"].format(l=l) for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(pairs.clean, attention_mask=mask, names_filter=lambda n: n in names)
        _, corrupt_cache = model.run_with_cache(pairs.corrupt, attention_mask=mask,
                                                names_filter=lambda n: n in names)
        m_base = float(_logit_diff(model(pairs.corrupt, attention_mask=mask), pairs).mean())
    slope = attribution_patch(model, pairs, "head", normalise=False).double() - m_base  # [layer head]
    errors = []
    for eps in (1e-1, 1e-2):
        exact = torch.zeros_like(slope)
        for l, n in enumerate(names):
            for h in range(model.cfg.n_heads):
                def put(act, hook, n=n, h=h):
                    act = act.clone()
                    act[:, :, h] += eps * (clean_cache[n][:, :, h] - corrupt_cache[n][:, :, h])
                    return act
                with torch.no_grad(), model.hooks(fwd_hooks=[(n, put)]):
                    exact[l, h] = float(_logit_diff(model(pairs.corrupt, attention_mask=mask), pairs).mean()) - m_base
        errors.append(float((exact - eps * slope).abs().max()))
    assert slope.abs().max() > 1e-2
    assert errors[1] < 0.03 * errors[0] + 1e-6  # second order: 100x smaller for a 10x smaller step
