"""The integrated-gradient variants MIB's circuit track compares (EAP-IG-activations, clean-corrupted) and
auto-circuit's mask-gradient IG, against references written here with plain TransformerLens hooks and
autograd (the hook names, source outputs and reader inputs of ``test_independent_references``; no
circuitkd code computes any reference value).

Definitions (MIB's ``get_scores_ig_activations`` / ``get_scores_clean_corrupted`` in the EAP-IG library;
auto-circuit's ``mask_gradient_prune_scores(integrated_grad_samples=steps)``):

- EAP-IG-activations: for each node group (embedding; all heads of a layer; an MLP) and ``k = 1..steps``,
  the group's output is replaced by the constant ``a clean + (1 - a) corrupt`` (``a = k/steps``) on the
  clean run; reader gradients averaged over groups and steps, times ``corrupt_src - clean_src``.
- clean-corrupted: reader gradients averaged over the clean and the corrupt run, times the difference.
- mask-gradient IG: every edge's reader adds ``m_e (corrupt_src - live_src)``; all ``m_e = k/steps``,
  ``k = 0..steps``; ``d metric / d m_e`` averaged over the ``steps + 1`` points.
"""
from __future__ import annotations

import pytest
import torch

import circuitkd.circuits as C
from circuitkd.circuits.gradients import check_steps
from circuitkd.errors import CircuitKDError

from .conftest import build, text_pairs
from .test_independent_references import (_graph_cell, _logit_diff, _reader_gradients, _reader_hooks,
                                          _readers, _run, _upstream, setup)  # noqa: F401 (setup is a fixture)

torch.set_num_threads(1)


def _groups(model):
    """(hook name, source indices) of each node group, in the graph's source order."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    out = [("blocks.0.hook_resid_pre", [0])]
    for l in range(L):
        first = 1 + l * (H + 1)
        out.append((f"blocks.{l}.hook_attn_out", list(range(first, first + H))))
        out.append((f"blocks.{l}.hook_mlp_out", [first + H]))
    return out


def _scores(model, graph, grads, delta, n_pairs):
    ref = torch.zeros(graph.shape)
    for reader, g in grads.items():
        for s in _upstream(model, reader):
            ref[_graph_cell(graph, reader, s)] = (delta[s] * g).sum() / n_pairs
    return ref


@pytest.mark.parametrize("steps", [2, 3])
def test_eap_ig_activations_equals_a_hand_written_sum_over_groups_and_steps(setup, steps):
    model, pairs, graph, clean_src, corrupt_src, *_ = setup
    total, runs = {}, 0
    for name, idx in _groups(model):
        b_O = model.blocks[int(name.split(".")[1])].attn.b_O if "attn_out" in name else 0.0
        for k in range(1, steps + 1):
            a = k / steps
            value = (a * clean_src[idx] + (1 - a) * corrupt_src[idx]).sum(0).detach() + b_O
            grads = _reader_gradients(setup, pairs.clean, lambda lg: _logit_diff(lg, pairs),
                                      first_hooks=[(name, lambda act, hook, v=value: v)])
            for reader, g in grads.items():
                total[reader] = total.get(reader, 0) + g
            runs += 1
    ref = _scores(model, graph, {r: g / runs for r, g in total.items()}, corrupt_src - clean_src, len(pairs))
    circuit = C.eap_ig_activations(model, pairs, metric=C.logit_diff, graph=graph, steps=steps, steps_per_forward=4)
    torch.testing.assert_close(circuit.scores, ref, atol=1e-5, rtol=1e-4)
    # not input-interpolation EAP-IG, nor EAP: a method that ignored the groups could not pass
    for other in (C.eap_ig(model, pairs, metric=C.logit_diff, graph=graph, steps=steps),
                  C.eap(model, pairs, metric=C.logit_diff, graph=graph)):
        assert (circuit.scores - other.scores).abs().max() > 1e-2


def test_clean_corrupted_equals_the_mean_of_the_two_end_point_gradients(setup):
    model, pairs, graph, clean_src, corrupt_src, *_ = setup
    metric = lambda lg: _logit_diff(lg, pairs)  # noqa: E731
    g_clean = _reader_gradients(setup, pairs.clean, metric)
    g_corrupt = _reader_gradients(setup, pairs.corrupt, metric)
    ref = _scores(model, graph, {r: (g_clean[r] + g_corrupt[r]) / 2 for r in g_clean}, corrupt_src - clean_src,
                  len(pairs))
    circuit = C.clean_corrupted(model, pairs, metric=C.logit_diff, graph=graph, batch_size=4)
    torch.testing.assert_close(circuit.scores, ref, atol=1e-5, rtol=1e-4)
    assert (circuit.scores - C.eap(model, pairs, metric=C.logit_diff, graph=graph).scores).abs().max() > 1e-2


def _live_sources(model, store):
    """Hooks that keep every source's output of the running forward (not detached), graph order."""
    L, H = model.cfg.n_layers, model.cfg.n_heads

    def put(i):
        return lambda act, hook: store.__setitem__(i, act)

    def put_heads(l):
        def fn(z, hook):
            for h in range(H):
                store[1 + l * (H + 1) + h] = torch.einsum("bpe,ed->bpd", z[:, :, h], model.blocks[l].attn.W_O[h])
        return fn

    out = [("blocks.0.hook_resid_pre", put(0))]
    for l in range(L):
        out += [(f"blocks.{l}.attn.hook_z", put_heads(l)), (f"blocks.{l}.hook_mlp_out", put(1 + l * (H + 1) + H))]
    return out


def _mask_gradient_reference(model, pairs, graph, corrupt_src, steps):
    total = torch.zeros(graph.shape, dtype=torch.float64)
    for k in range(steps + 1):
        store: dict = {}
        masks: dict = {}
        fwd = _live_sources(model, store)
        for reader in _readers(model):
            ups = _upstream(model, reader)
            m = {s: torch.tensor(k / steps, requires_grad=True) for s in ups}
            masks[reader] = m
            fwd += _reader_hooks(model, reader, lambda m=m, ups=ups: sum(m[s] * (corrupt_src[s] - store[s]) for s in ups))
        value = _logit_diff(_run(model, pairs.clean, fwd, pairs.attention_mask), pairs).sum()
        leaves = [(r, s) for r in masks for s in masks[r]]
        grads = torch.autograd.grad(value, [masks[r][s] for r, s in leaves])
        for (r, s), g in zip(leaves, grads):
            total[_graph_cell(graph, r, s)] += float(g)
    return (total / ((steps + 1) * len(pairs))).float()


@pytest.mark.parametrize("steps", [1, 3])
def test_mask_gradient_ig_equals_hand_written_edge_masks(setup, steps):
    model, pairs, graph, _, corrupt_src, *_ = setup
    ref = _mask_gradient_reference(model, pairs, graph, corrupt_src, steps)
    circuit = C.mask_gradient_ig(model, pairs, metric=C.logit_diff, graph=graph, steps=steps, steps_per_forward=3)
    torch.testing.assert_close(circuit.scores, ref, atol=1e-5, rtol=1e-4)
    assert (circuit.scores - C.eap(model, pairs, metric=C.logit_diff, graph=graph).scores).abs().max() > 1e-2


def test_mask_gradient_ig_scores_sum_to_the_corrupt_minus_clean_metric(setup):
    """Completeness: the path runs from the clean run (no edge ablated) to the corrupt run (all ablated)."""
    model, pairs, graph, _, _, clean_logits, corrupt_logits = setup
    circuit = C.mask_gradient_ig(model, pairs, metric=C.logit_diff, graph=graph, steps=40)
    gap = float((_logit_diff(corrupt_logits, pairs) - _logit_diff(clean_logits, pairs)).mean())
    total = float(circuit.scores.sum())
    assert abs(total - gap) < 0.02 * float(circuit.scores.abs().sum())


def test_variants_are_chunk_invariant_and_discoverable_on_every_backbone(model_and_pairs):
    kind, model, pairs = model_and_pairs
    graph = C.ComponentGraph.from_model(model)
    for fn in (C.eap_ig_activations, C.mask_gradient_ig):
        whole = fn(model, pairs, metric=C.logit_diff, graph=graph, steps=2)
        chunked = fn(model, pairs, metric=C.logit_diff, graph=graph, steps=2, steps_per_forward=1, batch_size=3)
        torch.testing.assert_close(whole.scores, chunked.scores, atol=1e-5, rtol=1e-4)
        assert whole.scores.abs().max() > 1e-4
    cc = C.clean_corrupted(model, pairs, metric=C.logit_diff, graph=graph)
    if kind != "bert":  # pre-LN: the differences are the same on both runs, so this is (EAP noising - denoising) / 2
        noise = C.eap(model, pairs, metric=C.logit_diff, graph=graph).scores
        denoise = C.eap(model, pairs, metric=C.logit_diff, graph=graph, direction="denoise").scores
        torch.testing.assert_close(cc.scores, (noise - denoise) / 2, atol=1e-5, rtol=1e-4)
    for method, options in (("eap-ig-activations", {"steps": 2}), ("clean-corrupted", {}),
                            ("mask-gradient-ig", {"steps": 2})):
        circuit = C.discover(model, pairs, method, top_k=5, check_post_ln=False, **options)
        assert circuit.method == method and circuit.n_edges == 5


def test_bad_inputs_name_the_bad_value():
    model, pairs = build("native"), text_pairs()
    graph = C.ComponentGraph.from_model(model)
    for fn in (C.eap_ig_activations, C.mask_gradient_ig):
        for bad in (0, -2):
            with pytest.raises(CircuitKDError, match=f"steps must be >= 1, got {bad}"):
                fn(model, pairs, metric=C.logit_diff, graph=graph, steps=bad)
        with pytest.raises(CircuitKDError, match="steps_per_forward must be >= 1, got 0"):
            fn(model, pairs, metric=C.logit_diff, graph=graph, steps=2, steps_per_forward=0)
        with pytest.raises(CircuitKDError, match="scores edges"):
            fn(model, pairs, metric=C.logit_diff, graph=C.ComponentGraph.from_model(model, level="node"))
    for bad in (2.5, True, "3"):  # (the methods' int annotation is also checked by beartype in the tests)
        with pytest.raises(CircuitKDError, match=f"steps must be a whole number >= 1, got {bad!r}"):
            check_steps(bad)
    with pytest.raises(CircuitKDError, match="ablation must be 'corrupt', got 'mean'"):
        C.clean_corrupted(model, pairs, metric=C.logit_diff, graph=graph, ablation="mean")
    with pytest.raises(CircuitKDError, match="unknown circuit method 'eap-ig-activation'") as err:
        C.discover(model, pairs, "eap-ig-activation")
    for name in ("eap-ig-activations", "clean-corrupted", "mask-gradient-ig", "eap-ig", "exact"):
        assert repr(name) in str(err.value)
    with pytest.raises(CircuitKDError, match=r"unknown keyword\(s\) \['steps'\]"):
        C.discover(model, pairs, "clean-corrupted", steps=3)
