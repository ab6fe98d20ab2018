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
    with C.hooked_only():
        slow = C.exact(model, pairs, metric=C.logit_diff, graph=g, ablation=ablation, edges_per_forward=1)
    torch.testing.assert_close(fast.scores, slow.scores, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked.scores, slow.scores, atol=1e-5, rtol=1e-4)
    # every kind of reader (q, k, v of both layers, both MLPs, the output) carries real effects
    assert (slow.scores.abs() > 1e-4).sum() > g.n_edges // 3
    assert fast.info["clean_metric"] == pytest.approx(slow.info["clean_metric"], abs=1e-5)


@pytest.mark.parametrize("kind,criterion", [("causal", "kl"), ("native", "metric"), ("bert", "kl")])
def test_acdc_sweep_equals_one_acdc_run_per_threshold(kind, criterion):
    from .conftest import build

    model = build(kind)
    pairs = text_pairs(position=7) if kind == "causal" else text_pairs()
    g = C.ComponentGraph.from_model(model)
    thresholds = [0.5, 1e-3, 3e-2, 1e-2, 3e-3, 0.1, 1e-4, 1e-5]  # none at a float-noise knife edge (0)
    sweep = C.acdc_sweep(model, pairs, metric=C.logit_diff, graph=g, thresholds=thresholds, criterion=criterion)
    sizes = []
    for t, got in zip(thresholds, sweep):
        ref = C.acdc(model, pairs, metric=C.logit_diff, graph=g, threshold=t, criterion=criterion,
                     candidates_per_forward=1)
        assert got.info["threshold"] == t
        assert torch.equal(got.mask, ref.mask), t
        torch.testing.assert_close(got.scores, ref.scores, atol=1e-5, rtol=1e-4)
        assert got.info["final_value"] == pytest.approx(ref.info["final_value"], abs=1e-5)
        sizes.append(int(got.mask.sum()))
    if kind != "bert":  # the scaled-up BERT's KL damages all exceed these thresholds: one state throughout
        assert len(set(sizes)) >= 3  # the thresholds really part ways
    # one forward per candidate edge (plus the full circuit), however many thresholds
    assert sweep[0].info["forwards"] == int(g.valid.sum()) + 1


def test_acdc_counts_one_forward_per_batch_of_pairs():
    """``info["forwards"]`` counts batched runs: with the pairs in two batches, twice as many, in the
    sweep (whose head candidates take the cached path) as in one plain ACDC run."""
    from .conftest import build

    model = build("native")
    pairs = text_pairs()
    half = (len(pairs) + 1) // 2
    g = C.ComponentGraph.from_model(model)
    one = C.acdc_sweep(model, pairs, metric=C.logit_diff, graph=g, thresholds=[1e-2], criterion="metric")
    two = C.acdc_sweep(model, pairs, metric=C.logit_diff, graph=g, thresholds=[1e-2], criterion="metric",
                       batch_size=half)
    assert one[0].info["forwards"] == int(g.valid.sum()) + 1
    assert two[0].info["forwards"] == 2 * one[0].info["forwards"]
    plain = C.acdc(model, pairs, metric=C.logit_diff, graph=g, threshold=1e-2, criterion="metric", batch_size=half,
                   candidates_per_forward=1)
    assert plain.info["forwards"] == two[0].info["forwards"]


def test_acdc_sweep_refuses_bad_input():
    from circuitkd.errors import CircuitKDError
    from .conftest import build

    model = build("native")
    g = C.ComponentGraph.from_model(model)
    with pytest.raises(CircuitKDError, match="criterion"):
        C.acdc_sweep(model, text_pairs(), metric=C.logit_diff, graph=g, thresholds=[0.1], criterion="l2")
    with pytest.raises(CircuitKDError, match="threshold"):
        C.acdc_sweep(model, text_pairs(), metric=C.logit_diff, graph=g, thresholds=[])


@pytest.mark.parametrize("kind", ["native", "causal"])
def test_native_edge_runner_read_positions_equal_its_full_logits(kind):
    """ACDC's runner computing only the read positions in the last layer equals its full logits there."""
    from circuitkd.circuits.base import batches
    from circuitkd.circuits.forward import NativeEdgeRunner
    from circuitkd.metrics import read_positions

    torch.manual_seed(0)
    model = build_model(SPECS[kind], device="cpu")
    pairs = _padded(text_pairs(position=-1 if kind == "causal" else 0))
    g = C.ComponentGraph.from_model(model)
    (bv,) = batches(model, g, pairs, batch_size=64)
    runner = NativeEdgeRunner(model, g, bv.pairs.clean, bv.pairs.attention_mask, bv.clean, bv.replacement)
    read = read_positions(bv.pairs, bv.pairs.clean.shape[1])
    gen = torch.Generator().manual_seed(2)
    for start in [0, g.reader_slice("head", 1).start, g.reader_slice("mlp", 1).start, g.reader_slice("output").start]:
        w = (torch.rand((3,) + g.shape, generator=gen) < 0.4).float()
        w[..., :start] = 0
        full = runner.logits(w)
        got = runner.logits(w, read)
        torch.testing.assert_close(got, full[torch.arange(full.shape[0]), read.repeat(3)], atol=1e-5, rtol=1e-5)
