"""Teacher-vs-student comparison and the circuit figures."""
from __future__ import annotations

import plotly.graph_objects as go
import torch

import circuitkd as ckd
import circuitkd.circuits as C
from circuitkd.config import ModelSpec
from circuitkd.models.build import build_model
from circuitkd.types import Edge, Node

from .conftest import text_pairs


def _circuit(n_layers, edges):
    spec = ModelSpec(backbone="native", n_layers=n_layers, d_model=32, n_heads=2, d_vocab=20, n_ctx=8, n_classes=2)
    g = C.ComponentGraph.from_model(build_model(spec, device="cpu"))
    scores = torch.zeros(g.shape)
    for e, s in edges.items():
        scores[g.edge_cell(e)] = s
    return C.Circuit(g, scores, scores != 0, method="test")


def test_compare_matches_by_relative_depth_and_sorts_edges():
    head = lambda l, h: Node("head", l, h)  # noqa: E731
    teacher = _circuit(4, {Edge(Node("embed"), head(0, 0), "k"): -2.0, Edge(head(3, 1), Node("output")): -3.0,
                           Edge(head(1, 0), head(2, 1), "v"): -1.0})
    student = _circuit(2, {Edge(Node("embed"), head(0, 0), "k"): -1.5, Edge(head(1, 1), Node("output")): -2.5,
                           Edge(Node("mlp", 0), Node("output")): 0.5})
    cmp = ckd.compare_circuits(teacher, student)
    assert cmp.node_map[head(3, 1)] == head(1, 1) and cmp.node_map[head(1, 0)] == head(0, 0)
    assert set(cmp.shared) == {Edge(Node("embed"), head(0, 0), "k"), Edge(head(3, 1), Node("output"))}
    assert cmp.lost == [Edge(head(1, 0), head(2, 1), "v")]
    assert cmp.new == [Edge(Node("mlp", 0), Node("output"))]
    assert cmp.teacher_shortcut[0][0] == Edge(head(3, 1), Node("output"))
    assert any("routes the shortcut through the teacher's leading edge" in v for v in cmp.verdicts)
    assert any("2/3 teacher edges survive" in v for v in cmp.verdicts)
    # an explicit functional matching overrides depth
    matching = {n: n for n in teacher.graph.sources + [Node("output")] if n.kind in ("embed", "output")}
    other = ckd.compare_circuits(teacher, student, matching=matching)
    assert other.matching.startswith("by function") and len(other.lost) == 3
    assert isinstance(cmp.to_dict()["verdicts"], list)


def test_figures_are_plotly_figures():
    from circuitkd.viz import circuits as V

    spec = ModelSpec(backbone="native", n_layers=2, d_model=32, n_heads=2, d_vocab=20, n_ctx=8, n_classes=2)
    model = build_model(spec, device="cpu")
    pairs = text_pairs()
    circuit = ckd.discover(model, pairs, "eap", top_k=6)
    res = C.faithfulness(model, pairs, circuit, fractions=(0.1, 0.5, 1.0))
    cmp = ckd.compare_circuits(circuit, circuit)
    figs = [V.circuit_figure(circuit, circuit, cmp), V.faithfulness_curves({"eap": res}), V.score_heatmap(circuit)]
    assert all(isinstance(f, go.Figure) and len(f.data) > 0 for f in figs)
    assert "CPR" in figs[1].data[0].name
    assert len(cmp.lost) == 0 and len(cmp.new) == 0


def test_head_matching_from_attention_overrides_depth_for_heads_only():
    from circuitkd.circuits.compare import head_matching

    head = lambda l, h: Node("head", l, h)  # noqa: E731
    teacher = _circuit(4, {Edge(head(3, 1), Node("output")): -3.0})
    student = _circuit(2, {Edge(head(0, 1), Node("output")): -2.0})
    # teacher head 3.1 behaves like student head 0.1 (as diff_attention's matching would say, teacher first)
    node_map = head_matching(teacher, student, [((3, 1), (0, 1), 0.9), ((0, 0), (1, 0), 0.8)])
    assert node_map[head(3, 1)] == head(0, 1) and node_map[head(0, 0)] == head(1, 0)
    assert node_map[head(2, 0)] is None  # unmatched teacher heads have no counterpart
    assert node_map[Node("mlp", 3)] == Node("mlp", 1) and node_map[Node("embed")] == Node("embed")
    cmp = ckd.compare_circuits(teacher, student, matching=node_map, matching_name="heads by attention pattern")
    assert cmp.shared == [Edge(head(3, 1), Node("output"))] and not cmp.lost and not cmp.new
    assert cmp.verdicts[0] == "components matched heads by attention pattern"
    # by relative depth the same pair of circuits shares nothing
    assert ckd.compare_circuits(teacher, student).shared == []
