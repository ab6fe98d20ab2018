"""The teacher-vs-student circuit view: what it draws, checked on the figure object."""
from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch

import circuitkd as ckd
from circuitkd.circuits import Circuit, ComponentGraph
from circuitkd.circuits.compare import head_matching
from circuitkd.errors import CircuitKDError
from circuitkd.types import Edge, Node
from circuitkd.viz.circuits import DASH, NEGATIVE, POSITIVE, circuit_figure

from .figure_checks import assert_edges_end_on_drawn_nodes, drawn_nodes, drawn_ports, traces

EMBED, OUT = Node("embed"), Node("output")


def head(layer: int, h: int) -> Node:
    return Node("head", layer, h)


def make_circuit(n_layers: int, n_heads: int, kept: dict, unkept: dict | None = None, n_pos=None) -> Circuit:
    graph = ComponentGraph("native", n_layers, n_heads, has_mlp=True, post_ln=False, n_pos=n_pos)
    scores = torch.zeros(graph.shape)
    mask = torch.zeros(graph.shape, dtype=torch.bool)
    for edges, keep in ((kept, True), (unkept or {}, False)):
        for e, s in edges.items():
            s_idx, r_idx = graph.edge_cell(e)
            if n_pos:
                scores[0, s_idx, r_idx] = s  # the rest of the score sits at position 0
                mask[0, s_idx, r_idx] = keep
            else:
                scores[s_idx, r_idx] = s
                mask[s_idx, r_idx] = keep
    return Circuit(graph, scores, mask, method="test")


# teacher 3 layers x 3 heads, student 2 x 2; student 0.0 ~ teacher 0.1, 1.1 ~ 2.2, 0.1 ~ 1.2, 1.0 ~ 2.0
MATCHES = [((0, 1), (0, 0), 0.9), ((2, 2), (1, 1), 0.8), ((1, 2), (0, 1), 0.7), ((2, 0), (1, 0), 0.6)]
TEACHER = {Edge(EMBED, head(0, 1), "k"): -0.5, Edge(head(0, 1), head(2, 2), "v"): 0.8,
           Edge(head(2, 2), OUT): -1.2, Edge(head(1, 0), Node("mlp", 1)): 0.3,
           Edge(Node("mlp", 0), head(2, 2), "q"): 0.2}
STUDENT = {Edge(EMBED, head(0, 0), "k"): -0.4, Edge(head(0, 0), head(1, 1), "v"): 0.6,
           Edge(head(1, 1), OUT): -1.5, Edge(head(0, 1), OUT): 0.9, Edge(EMBED, Node("mlp", 1)): -0.1}
STUDENT_UNKEPT = {Edge(Node("mlp", 0), head(1, 1), "q"): 0.05}


@pytest.fixture
def trio():
    teacher = make_circuit(3, 3, TEACHER)
    student = make_circuit(2, 2, STUDENT, STUDENT_UNKEPT)
    cmp = ckd.compare_circuits(teacher, student, matching=head_matching(teacher, student, MATCHES),
                               matching_name="heads by attention pattern")
    return teacher, student, cmp


def test_each_model_draws_its_own_nodes_and_every_edge_ends_on_one(trio):
    teacher, student, cmp = trio
    fig = circuit_figure(teacher, student, cmp, teacher_name="T-id", student_name="S-id")
    assert isinstance(fig, go.Figure)
    for who, circuit in (("teacher", teacher), ("student", student)):
        assert set(drawn_nodes(fig, who)) == {str(n) for n in circuit.nodes()}
        assert {t.meta["edge"] for t in traces(fig, "edge", who)} == {str(e) for e in circuit.edges}
        (grid,) = traces(fig, "components", who)
        assert len(grid.x) == circuit.graph.n_sources + 1  # every component, faint
    assert_edges_end_on_drawn_nodes(fig)
    # the two panels do not overlap: every student point lies right of every teacher point
    t_x = [x for t in traces(fig, "components", "teacher") for x in t.x]
    s_x = [x for t in traces(fig, "components", "student") for x in t.x]
    assert max(t_x) < min(s_x)
    # the three q/k/v ports of a head are distinct points
    ports = drawn_ports(fig, "teacher")
    assert ports[("2.2", "v")] != ports[("2.2", "q")]


def test_status_sign_width_and_hover(trio):
    teacher, student, cmp = trio
    fig = circuit_figure(teacher, student, cmp)
    status = {(t.meta["model"], t.meta["edge"]): t.meta["status"] for t in traces(fig, "edge")}
    assert {e for (m, e), s in status.items() if m == "teacher" and s == "lost"} == {str(e) for e in cmp.lost}
    assert {e for (m, e), s in status.items() if m == "student" and s == "new"} == {str(e) for e in cmp.new}
    assert status[("student", "0.0->1.1<v>")] == "shared" and status[("teacher", "0.1->2.2<v>")] == "shared"
    edges = traces(fig, "edge")
    for t in edges:
        assert t.line.dash == DASH[t.meta["status"]]
        assert t.line.color == (POSITIVE if t.meta["score"] > 0 else NEGATIVE)
    # width grows with |score| on one scale for both models
    by_score = sorted(edges, key=lambda t: abs(t.meta["score"]))
    assert [t.line.width for t in by_score] == sorted(t.line.width for t in by_score)
    assert by_score[-1].meta["edge"] == "1.1->output" and by_score[-1].meta["model"] == "student"
    hover = {(t.meta["model"], t.meta["edge"]): t.hovertext[1] for t in edges}
    shared = hover[("teacher", "0.1->2.2<v>")]
    assert "teacher score +0.8" in shared and "student score +0.6" in shared and "heads by attention pattern" in shared
    lost = hover[("teacher", "mlp0->2.2<q>")]
    assert "student score +0.05" in lost and "not in its circuit" in lost
    assert "no counterpart" in hover[("teacher", "1.0->mlp1")]  # teacher head 1.0 has no student match
    new = hover[("student", "0.1->output")]
    assert "teacher score +0" in new and "head 1.2 → output" in new  # its matched teacher edge, not kept
    # the matched component is named beside each node
    (mates,) = traces(fig, "matching", "student")
    labels = dict(zip(mates.customdata, mates.text))
    assert labels["1.1"] == "≙T 2.2" and labels["0.1"] == "≙T 1.2"
    assert "3/5 teacher edges kept by the student · 2 lost · 2 new" in fig.layout.title.text


def test_axes_are_categorical_rows_and_layer_columns(trio):
    fig = circuit_figure(*trio)
    rows = list(fig.layout.yaxis.ticktext)
    assert rows == ["embed", "head 0", "head 1", "head 2", "MLP", "output"]
    assert list(fig.layout.yaxis.tickvals) == list(range(len(rows)))
    assert list(fig.layout.xaxis.ticktext) == ["emb", "L0", "L1", "L2", "out", "emb", "L0", "L1", "out"]
    nodes = drawn_nodes(fig, "teacher")
    assert nodes["mlp0"][1] == rows.index("MLP") and nodes["2.2"][1] == rows.index("head 2")
    assert nodes["embed"][0] < nodes["0.1"][0] < nodes["mlp0"][0] < nodes["2.2"][0] < nodes["output"][0]


def test_per_position_circuits_are_summed_over_positions():
    teacher = make_circuit(3, 3, TEACHER, n_pos=4)
    student = make_circuit(2, 2, STUDENT, n_pos=4)
    cmp = ckd.compare_circuits(teacher, student, matching=head_matching(teacher, student, MATCHES))
    fig = circuit_figure(teacher, student, cmp)
    assert_edges_end_on_drawn_nodes(fig)
    assert len(traces(fig, "edge", "teacher")) == len(TEACHER)


def test_bad_input_is_named(trio):
    teacher, student, cmp = trio
    other = make_circuit(2, 2, {Edge(EMBED, OUT): 1.0})
    with pytest.raises(CircuitKDError, match="does not belong to these circuits"):
        circuit_figure(teacher, other, cmp)
    node_level = Circuit(ComponentGraph("bert", 2, 2, True, True, level="node"), torch.ones(7))
    with pytest.raises(CircuitKDError, match="student circuit is node level"):
        circuit_figure(teacher, node_level, cmp)


def test_a_discovered_circuit_is_drawn_whole():
    from circuitkd.config import ModelSpec
    from circuitkd.models.build import build_model
    from tests.circuits.conftest import text_pairs

    spec = ModelSpec(backbone="native", n_layers=2, d_model=32, n_heads=2, d_vocab=20, n_ctx=8, n_classes=2)
    model = build_model(spec, device="cpu")
    circuit = ckd.discover(model, text_pairs(), "eap", top_k=8)
    fig = circuit_figure(circuit, circuit, ckd.compare_circuits(circuit, circuit))
    assert_edges_end_on_drawn_nodes(fig)
    assert len(traces(fig, "edge", "teacher")) == len(traces(fig, "edge", "student")) == 8
    assert all(t.meta["status"] == "shared" for t in traces(fig, "edge"))
