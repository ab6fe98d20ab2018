"""The hook-free fast paths of exact patching and the ACDC threshold sweep against the hooked,
one-at-a-time references (issue 15)."""
from __future__ import annotations

import importlib

import pytest
import torch

import circuitkd.circuits as C
from circuitkd.models.build import build_model

from .conftest import SPECS, text_pairs

exact_module = importlib.import_module("circuitkd.circuits.exact")


def _padded(pairs):
    mask = torch.ones_like(pairs.clean)
    mask[0, -2:] = 0
    mask[3, -1:] = 0
    return type(pairs)(clean=pairs.clean, corrupt=pairs.corrupt, clean_answer=pairs.clean_answer,
                       corrupt_answer=pairs.corrupt_answer, position=pairs.position, attention_mask=mask)


@pytest.mark.parametrize("kind,position", [("native", 0), ("causal", -1), ("causal", 5)])
@pytest.mark.parametrize("ablation", ["corrupt", "mean"])
def test_native_exact_equals_hooked_one_edge_at_a_time(monkeypatch, kind, position, ablation):
    torch.manual_seed(0)
    model = build_model(SPECS[kind], device="cpu")
    pairs = _padded(text_pairs(position=position))
    g = C.ComponentGraph.from_model(model)
    fast = C.exact(model, pairs, metric=C.logit_diff, graph=g, ablation=ablation, batch_size=4)
    chunked = C.exact(model, pairs, metric=C.logit_diff, graph=g, ablation=ablation, edges_per_forward=3)
    monkeypatch.setattr(exact_module, "_NATIVE_RUNNER", False)
    slow = C.exact(model, pairs, metric=C.logit_diff, graph=g, ablation=ablation, edges_per_forward=1)
    torch.testing.assert_close(fast.scores, slow.scores, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked.scores, slow.scores, atol=1e-5, rtol=1e-4)
    # every kind of reader (q, k, v of both layers, both MLPs, the output) carries real effects
    assert (slow.scores.abs() > 1e-4).sum() > g.n_edges // 3
    assert fast.info["clean_metric"] == pytest.approx(slow.info["clean_metric"], abs=1e-5)
