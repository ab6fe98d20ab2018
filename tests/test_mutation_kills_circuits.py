"""Tests written for mutants of circuitkd/circuits/ that the suite let live (docs/testing.md lists them).

What the other circuit tests never looked at: that patching with identical activations changes
nothing (node effects are differences from the clean run), and the keys a comparison or a circuit
is saved under. Tiny models from config.
"""
import pytest
import torch

import circuitkd as ckd
import circuitkd.circuits as C
from circuitkd.types import PromptPairs
from tests.circuits.conftest import build, text_pairs


def test_node_effects_are_zero_when_clean_and_corrupt_agree():
    """Kills: postln.node_effects adding the clean baseline instead of subtracting it; validate_post_ln
    reporting the real effects under another key."""
    model = build("bert")
    p = text_pairs(n=2)
    same = PromptPairs(clean=p.clean, corrupt=p.clean.clone(), clean_answer=p.clean_answer,
                       corrupt_answer=p.corrupt_answer, position=p.position)
    graph = C.ComponentGraph.from_model(model)
    effects = C.postln.node_effects(model, graph, same, metric=C.logit_diff, frozen=False)
    torch.testing.assert_close(effects, torch.zeros(graph.n_sources), atol=1e-5, rtol=0)
    report = C.validate_post_ln(model, p, tolerance=0.4)
    real = C.postln.node_effects(model, graph, p, metric=C.logit_diff, frozen=False)
    assert real.abs().max() > 1e-3
    torch.testing.assert_close(torch.tensor(report["real"]), real)


@pytest.mark.parametrize("method", ["eap-ig-activations", "mask-gradient-ig"])
def test_ig_circuits_record_their_steps(method):
    """Kills: the circuit's info saving the number of integration steps under another key."""
    circuit = ckd.discover(build("native"), text_pairs(), method=method, steps=3)
    assert circuit.info["steps"] == 3 and circuit.info["n_pairs"] == 6


def test_a_comparison_saves_every_edge_list_under_its_name():
    """Kills: CircuitComparison.to_dict writing another key, or something other than the edges."""
    model = build("native")
    teacher = ckd.discover(model, text_pairs(), method="eap", top_k=6)
    student = ckd.discover(model, text_pairs(seed=1), method="eap", top_k=6)
    cmp = ckd.compare_circuits(teacher, student)
    assert cmp.shared, "the same model's circuits on two pair sets should share edges"
    saved = cmp.to_dict()
    for name in ("shared", "lost", "new"):
        assert saved[name] == [str(e) for e in getattr(cmp, name)]
