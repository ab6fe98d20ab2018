"""Every patching metric, both directions, fast and hooked paths, with padding: against plain hooks.

The reference patches one head's ``z`` at one position with ``model.hooks`` and computes the
metric by hand (KL with ``torch.nn.functional.kl_div``: KL(p_clean || p_patched), the clean run
being the run on ``pairs.clean`` in both directions); it imports no circuitkd metric, executor
or hook code. Padding: two pairs are padded, so a read-out or mask bug shows.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from circuitkd import ModelSpec, PromptPairs, build_model
from circuitkd.patching import patch_result
from tests.hand_reference import random_pairs

torch.set_num_threads(1)

N, P, V = 5, 8, 30
POSITIONS = [0, 3, 6, 7]


def _model(causal: bool):
    torch.manual_seed(1)
    kw = dict(causal=True) if causal else dict(n_classes=3)
    return build_model(ModelSpec(backbone="native", n_layers=2, d_model=32, n_heads=2, d_vocab=V, n_ctx=P, **kw),
                       device="cpu")


@pytest.fixture(scope="module")
def models():
    return {False: _model(False), True: _model(True)}


def _pairs(causal: bool) -> PromptPairs:
    n_out = V if causal else 3
    return random_pairs(N, P, V, padding={0: 2, 1: 1}, n_out=n_out, position=-1 if causal else 0)


def _read(logits, pairs, causal):
    if not causal:
        return logits[:, 0]
    last = pairs.attention_mask.sum(1) - 1  # each example's last real token
    return logits[torch.arange(N), last]


def _metric(name, read, clean_read, pairs):
    idx = torch.arange(N)
    a, b = pairs.clean_answer, pairs.corrupt_answer
    if name == "logit_diff":
        return read[idx, a] - read[idx, b]
    if name == "prob_diff":
        p = read.double().softmax(-1)
        return p[idx, a] - p[idx, b]
    return F.kl_div(read.double().log_softmax(-1), clean_read.double().log_softmax(-1), log_target=True,
                    reduction="none").sum(-1)


def _hand_patch(model, pairs, causal, direction):
    """Reads of the base run with head (l, h)'s z at position p taken from the source run."""
    base, src = (pairs.corrupt, pairs.clean) if direction == "denoise" else (pairs.clean, pairs.corrupt)
    mask = pairs.attention_mask
    L, H = model.cfg.n_layers, model.cfg.n_heads
    with torch.no_grad():
        _, cache = model.run_with_cache(src, attention_mask=mask, names_filter=lambda n: n.endswith("attn.hook_z"))
        reads = {k: _read(model(x, attention_mask=mask), pairs, causal)
                 for k, x in (("clean", pairs.clean), ("corrupt", pairs.corrupt))}
        out = torch.zeros(L, H, len(POSITIONS), N, reads["clean"].shape[-1])
        for l in range(L):
            z_src = cache[f"blocks.{l}.attn.hook_z"]
            for h in range(H):
                for i, p in enumerate(POSITIONS):
                    def put(act, hook, h=h, p=p, z_src=z_src):
                        act = act.clone()
                        act[:, p, h] = z_src[:, p, h]
                        return act
                    with model.hooks(fwd_hooks=[(f"blocks.{l}.attn.hook_z", put)]):
                        out[l, h, i] = _read(model(base, attention_mask=mask), pairs, causal)
    return out, reads


@pytest.fixture(scope="module")
def hand(models):
    return {(c, d): _hand_patch(models[c], _pairs(c), c, d) for c in (False, True) for d in ("denoise", "noise")}


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("metric", ["logit_diff", "prob_diff", "kl"])
def test_metric_direction_and_normalisation_equal_hand_hooks(models, hand, causal, direction, metric):
    model, pairs = models[causal], _pairs(causal)
    patched, reads = hand[(causal, direction)]
    clean_read = reads["clean"]
    ref_raw = torch.stack([_metric(metric, r, clean_read, pairs) for r in patched.view(-1, *patched.shape[-2:])]) \
        .mean(-1).view(patched.shape[:3])
    m_clean = float(_metric(metric, clean_read, clean_read, pairs).mean())
    m_corrupt = float(_metric(metric, reads["corrupt"], clean_read, pairs).mean())
    ref_norm = (ref_raw - m_corrupt) / (m_clean - m_corrupt)
    # the references are not degenerate: the patches move the metric, and the KL's two directions differ
    base = m_corrupt if direction == "denoise" else m_clean
    assert (ref_raw - base).abs().max() > 1e-3
    if metric == "kl":
        assert m_clean == pytest.approx(0.0, abs=1e-9)
        backwards = float(_metric("kl", clean_read, reads["corrupt"], pairs).mean())
        assert abs(backwards - m_corrupt) > 1e-4  # 30x the tolerance below
    for method in ("fast", "stacked", "reference"):
        res = patch_result(model, pairs, "head_pos", metric=metric, direction=direction, method=method,
                           positions=POSITIONS, batch_size=3)
        assert res.clean == pytest.approx(m_clean, abs=1e-5) and res.corrupt == pytest.approx(m_corrupt, abs=1e-5)
        torch.testing.assert_close(res.raw.double(), ref_raw.double(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res.values.double(), ref_norm.double(), atol=1e-4, rtol=1e-4)
