"""Every fast path against a slow or independent reference, on every supported backbone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import circuitkd.circuits as C
from circuitkd import hooks
from circuitkd.circuits.forward import patched_forward, source_values
from circuitkd.hooks import Site
from circuitkd.types import Edge, Node

from .conftest import build, text_pairs


def _values(model, pairs):
    g = C.ComponentGraph.from_model(model)
    return g, source_values(model, g, pairs.clean), source_values(model, g, pairs.corrupt)


def test_patched_forward_reproduces_clean_and_corrupt_runs(model_and_pairs):
    kind, model, pairs = model_and_pairs
    g, clean, corrupt = _values(model, pairs)
    # recomputing every reader from the rebuilt residual (the gradient path) changes nothing
    run = patched_forward(model, g, pairs.clean, replacement=corrupt.outputs, norm_scales=clean.norm_scales,
                          reader_grads=True)
    torch.testing.assert_close(run.logits, clean.logits, atol=1e-5, rtol=1e-5)
    if not g.post_ln:
        # ablating every edge of a pre-LN model with corrupt values is the corrupt run, exactly
        run = patched_forward(model, g, pairs.clean, ablate=g.valid.float()[None], replacement=corrupt.outputs)
        torch.testing.assert_close(run.logits, corrupt.logits, atol=1e-4, rtol=1e-4)
        assert (clean.logits - corrupt.logits).abs().max() > 1e-2


def test_exact_batched_equals_one_edge_at_a_time(model_and_pairs):
    kind, model, pairs = model_and_pairs
    g = C.ComponentGraph.from_model(model)
    fast = C.exact(model, pairs, metric=C.logit_diff, graph=g, edges_per_forward=64)
    slow = C.exact(model, pairs, metric=C.logit_diff, graph=g, edges_per_forward=1)
    torch.testing.assert_close(fast.scores, slow.scores, atol=1e-5, rtol=1e-4)
    assert fast.scores.abs().max() > 1e-3


def test_exact_matches_an_independent_hook_reference():
    """Edge embed -> 1.1<k> patched by hand: rebuild only head 1's key input from the residual."""
    model = build("native")
    pairs = text_pairs()
    g, clean, corrupt = _values(model, pairs)
    circuit = C.exact(model, pairs, metric=C.logit_diff, graph=g)
    ln1 = hooks.norm_module(model, 1, "ln1")
    store = {}

    def keep(act, *, hook):
        store["pre"] = act

    def patch_k(act, *, hook):
        resid = store["pre"] - clean.outputs[:, :, 0] + corrupt.outputs[:, :, 0]
        x = F.layer_norm(resid, (resid.shape[-1],), ln1.weight, ln1.bias, ln1.eps)
        k = torch.einsum("bpd,hde->bphe", x, model.blocks[1].attn.W_K) + model.blocks[1].attn.b_K
        out = act.clone()
        out[:, :, 1] = k[:, :, 1]
        return out

    with torch.no_grad(), hooks.edit_hooks(model, [(hooks.hook_name(model, Site(1, "resid_pre")), keep),
                                                   (hooks.hook_name(model, Site(1, "k")), patch_k)]):
        logits = model(pairs.clean)
    expected = float((C.logit_diff(logits, pairs) - C.logit_diff(clean.logits, pairs)).mean())
    s, r = g.edge_cell(Edge(Node("embed"), Node("head", 1, 1), "k"))
    assert abs(float(circuit.scores[s, r]) - expected) < 1e-5
    assert abs(expected) > 1e-4


def test_eap_equals_naive_per_edge_gradient(model_and_pairs):
    """EAP score = d metric / d alpha at alpha=0, alpha scaling one edge's ablation, edge by edge."""
    kind, model, pairs = model_and_pairs
    g, clean, corrupt = _values(model, pairs)
    fast = C.eap(model, pairs, metric=C.logit_diff, graph=g)
    naive = torch.zeros(g.shape)
    for s, r in g.valid.nonzero().tolist():
        alpha = torch.zeros((), requires_grad=True)
        onehot = torch.zeros(g.shape)
        onehot[s, r] = 1.0
        run = patched_forward(model, g, pairs.clean, ablate=(alpha * onehot)[None], replacement=corrupt.outputs,
                              norm_scales=clean.norm_scales)
        (grad,) = torch.autograd.grad(C.logit_diff(run.logits, pairs).mean(), alpha)
        naive[s, r] = grad
    torch.testing.assert_close(fast.scores, naive, atol=1e-5, rtol=1e-4)
    assert naive.abs().max() > 1e-3


def test_eap_ig_with_one_step_is_eap_and_chunking_changes_nothing():
    # Input-interpolation EAP-IG need not approach exact patching as steps grow (it does not on this
    # model); its k > 1 value is checked against a hand-written Riemann sum in
    # test_independent_references.py. Here: steps=1 is EAP, and chunking the steps changes nothing.
    model = build("native")
    pairs = text_pairs()
    g = C.ComponentGraph.from_model(model)
    eap = C.eap(model, pairs, metric=C.logit_diff, graph=g)
    ig1 = C.eap_ig(model, pairs, metric=C.logit_diff, graph=g, steps=1)
    torch.testing.assert_close(ig1.scores, eap.scores, atol=1e-6, rtol=1e-5)
    ig = C.eap_ig(model, pairs, metric=C.logit_diff, graph=g, steps=8, steps_per_forward=3)
    ig_one_forward = C.eap_ig(model, pairs, metric=C.logit_diff, graph=g, steps=8)
    torch.testing.assert_close(ig.scores, ig_one_forward.scores, atol=1e-6, rtol=1e-5)
    assert (ig.scores - eap.scores).abs().max() > 1e-2  # 8 steps is not EAP again


def test_acdc_batched_equals_sequential(model_and_pairs):
    kind, model, pairs = model_and_pairs
    g = C.ComponentGraph.from_model(model)
    fast = C.acdc(model, pairs, metric=C.logit_diff, graph=g, threshold=1e-3)
    slow = C.acdc(model, pairs, metric=C.logit_diff, graph=g, threshold=1e-3, candidates_per_forward=1)
    assert torch.equal(fast.mask, slow.mask)
    torch.testing.assert_close(fast.scores, slow.scores, atol=1e-5, rtol=1e-4)
    assert fast.info["forwards"] < slow.info["forwards"]


def test_per_position_scores_sum_to_the_position_free_ones():
    model = build("native")
    pairs = text_pairs()
    whole = C.discover(model, pairs, "eap")
    per = C.discover(model, pairs, "eap", per_position=True)
    assert per.scores.shape == (8,) + whole.scores.shape
    torch.testing.assert_close(per.scores.sum(0), whole.scores, atol=1e-5, rtol=1e-4)
    ex = C.discover(model, pairs[:2], "exact", per_position=True)
    ex1 = C.exact(model, pairs[:2], metric=C.logit_diff, graph=ex.graph, edges_per_forward=1)
    torch.testing.assert_close(ex.scores, ex1.scores, atol=1e-5, rtol=1e-4)


def test_faithfulness_endpoints_and_curve():
    model = build("native")
    pairs = text_pairs()
    circuit = C.discover(model, pairs, "exact")
    res = C.faithfulness(model, pairs, circuit, fractions=(0.1, 0.5, 1.0))
    assert res.recovered == pytest.approx(1.0, abs=1e-5)  # the default mask is the whole graph
    assert res.curve[0] == pytest.approx(0.0, abs=1e-5) and res.curve[-1] == pytest.approx(1.0, abs=1e-5)
    g, clean, corrupt = _values(model, pairs)
    assert res.full_metric == pytest.approx(float(C.logit_diff(clean.logits, pairs).mean()), abs=1e-5)
    assert res.empty_metric == pytest.approx(float(C.logit_diff(corrupt.logits, pairs).mean()), abs=1e-4)
    assert 0 <= res.cmd and res.sizes[0] == 0 and res.sizes[-1] == g.n_edges
    for ablation in ("mean", "zero"):
        r = C.faithfulness(model, pairs, circuit.top_k(5), ablation=ablation, fractions=(0.5, 1.0))
        assert r.curve[-1] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kind", ["native", "causal"])
@pytest.mark.parametrize("ablation", ["corrupt", "mean"])
def test_native_edge_runner_equals_patched_forward(kind, ablation):
    """ACDC's hook-free forward (starting at the first ablated layer) against the hooked edge patching."""
    from circuitkd.circuits.base import batches
    from circuitkd.circuits.forward import NativeEdgeRunner, native_edge_supported
    from .conftest import SPECS
    from circuitkd.models.build import build_model

    torch.manual_seed(0)
    model = build_model(SPECS[kind], device="cpu")
    pairs = text_pairs()
    mask = torch.ones_like(pairs.clean)
    mask[0, -2:] = 0  # a padded example
    pairs = type(pairs)(clean=pairs.clean, corrupt=pairs.corrupt, clean_answer=pairs.clean_answer,
                        corrupt_answer=pairs.corrupt_answer, position=pairs.position, attention_mask=mask)
    g = C.ComponentGraph.from_model(model)
    assert native_edge_supported(model, g)
    (bv,) = batches(model, g, pairs, batch_size=64, ablation=ablation)
    runner = NativeEdgeRunner(model, g, bv.pairs.clean, bv.pairs.attention_mask, bv.clean, bv.replacement)
    gen = torch.Generator().manual_seed(1)
    first_reader = [0, g.reader_slice("head", 1).start, g.reader_slice("output").start]
    for start, p in [(r, q) for r in first_reader for q in (0.0, 0.3, 1.0)]:
        w = (torch.rand((4,) + g.shape, generator=gen) < p).float()
        w[..., :start] = 0
        w[1] = 0  # one copy with nothing ablated
        w[2, :, 1:] = 1.0  # and invalid cells set, which both paths ignore
        with torch.no_grad():
            ref = patched_forward(model, g, bv.pairs.clean, bv.pairs.attention_mask, ablate=w,
                                  replacement=bv.replacement).logits
        torch.testing.assert_close(runner.logits(w), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runner.logits(torch.zeros((1,) + g.shape)), bv.clean.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("criterion,threshold", [("kl", 1e-3), ("kl", 1e-2), ("metric", 1e-2)])
def test_acdc_native_runner_equals_hooked_path(monkeypatch, criterion, threshold):
    model = build("causal")
    pairs = text_pairs(position=7)  # read the last token: every edge can matter in the causal model
    g = C.ComponentGraph.from_model(model)
    fast = C.acdc(model, pairs, metric=C.logit_diff, graph=g, threshold=threshold, criterion=criterion)
    with C.hooked_only():
        slow = C.acdc(model, pairs, metric=C.logit_diff, graph=g, threshold=threshold, criterion=criterion)
    assert torch.equal(fast.mask, slow.mask)
    torch.testing.assert_close(fast.scores, slow.scores, atol=1e-5, rtol=1e-4)
    assert fast.info["forwards"] == slow.info["forwards"]
    assert 0 < fast.n_edges < int(g.valid.sum())
