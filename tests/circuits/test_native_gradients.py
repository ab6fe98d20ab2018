"""The hook-free reader gradients of native pre-LN models (``circuitkd.circuits.native_gradients``) against
the hooked path (a zero leaf on every reader input of ``patched_forward``), for every gradient method,
with padding masks (issue 15)."""
from __future__ import annotations

import importlib

import pytest
import torch

import circuitkd.circuits as C
from circuitkd.circuits.base import batches
from circuitkd.circuits.gradients import hooked_reader_gradients
from circuitkd.models.build import build_model

from .conftest import SPECS, text_pairs
from .test_fast_paths import _padded

NG = importlib.import_module("circuitkd.circuits.native_gradients")


def _setup(kind, position):
    torch.manual_seed(0)
    model = build_model(SPECS[kind], device="cpu")
    return model, _padded(text_pairs(position=position)), C.ComponentGraph.from_model(model)


@pytest.mark.parametrize("kind,position", [("native", 0), ("causal", -1)])
def test_native_reader_gradients_equal_hooked_leaves(kind, position):
    """Every reader's input gradient (q/k/v of each head, each MLP, the output), summed over copies with
    an interpolated embedding, equals the hooked path's leaf gradients."""
    model, pairs, g = _setup(kind, position)
    bv = next(batches(model, g, pairs, batch_size=len(pairs)))
    K, B = 3, len(pairs)
    a = torch.tensor([0.2, 0.7, 1.0]).view(K, 1, 1, 1)
    emb = bv.corrupt.outputs[:, :, 0][None] + a * (bv.clean.outputs[:, :, 0] - bv.corrupt.outputs[:, :, 0])[None]
    emb = emb.reshape(K * B, *emb.shape[2:])
    assert NG.supported(model, g, pairs.clean)
    fast = NG.reader_gradients(model, g, bv, C.logit_diff, pairs.clean, n_copies=K, embed=emb)
    slow = hooked_reader_gradients(model, g, bv, C.logit_diff, pairs.clean, n_copies=K, embed_override=emb)
    assert set(fast) == set(slow)
    for key in slow:
        torch.testing.assert_close(fast[key], slow[key], atol=1e-5, rtol=1e-4, msg=str(key))
        assert slow[key].abs().max() > 1e-3, key  # every reader kind carries a real gradient


@pytest.mark.parametrize("kind,position", [("native", 0), ("causal", -1)])
@pytest.mark.parametrize("method,options", [
    ("eap", {}), ("eap", {"direction": "denoise"}), ("clean-corrupted", {}),
    ("eap-ig", {"steps": 3}), ("eap-ig", {"steps": 3, "steps_per_forward": 2, "ablation": "mean"}),
    ("eap-ig-activations", {"steps": 2}), ("eap-ig-activations", {"steps": 3, "steps_per_forward": 2, "ablation": "zero"}),
    ("mask-gradient-ig", {"steps": 3}), ("mask-gradient-ig", {"steps": 2, "steps_per_forward": 2, "ablation": "mean"}),
])
def test_native_fast_path_equals_hooked_path(monkeypatch, kind, position, method, options):
    model, pairs, g = _setup(kind, position)
    fn = C.METHODS[method]
    fast = fn(model, pairs, metric=C.logit_diff, graph=g, batch_size=4, **options)
    with C.hooked_only():
        slow = fn(model, pairs, metric=C.logit_diff, graph=g, batch_size=4, **options)
    torch.testing.assert_close(fast.scores, slow.scores, atol=1e-5, rtol=1e-4)
    assert (slow.scores.abs() > 1e-4).sum() > g.n_edges // 3


def test_hooked_models_do_not_take_the_native_path():
    torch.manual_seed(0)
    model = build_model(SPECS["bert"], device="cpu")
    g = C.ComponentGraph.from_model(model)
    assert not NG.supported(model, g, text_pairs().clean)
    causal = build_model(SPECS["causal"], device="cpu")
    gp = C.ComponentGraph.from_model(causal, per_position=True, n_pos=8)
    assert NG.supported(causal, gp, text_pairs().clean)  # reader gradients do not depend on positions
    assert not NG.supported(causal, gp, text_pairs().clean, per_position=False)  # mask gradients do


def test_hooked_only_switches_every_native_path_off_inside_its_block_only():
    """The native-vs-hooked comparisons above mean something only if hooked_only() really takes the
    hooked path: inside it no native path is chosen (reader gradients, source values, edge runners),
    and outside it they are again."""
    from circuitkd.circuits import forward as F_

    torch.manual_seed(0)
    causal = build_model(SPECS["causal"], device="cpu")
    g = C.ComponentGraph.from_model(causal)
    tokens = text_pairs().clean
    calls = []
    real = F_._native_source_values
    F_._native_source_values = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with C.hooked_only():
            assert not NG.supported(causal, g, tokens)
            F_.source_values(causal, g, tokens, None)
        assert calls == []
        assert NG.supported(causal, g, tokens)
        F_.source_values(causal, g, tokens, None)
        assert calls == [1]
    finally:
        F_._native_source_values = real
