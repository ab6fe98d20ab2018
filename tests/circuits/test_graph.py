"""ComponentGraph structure, Circuit selection and JSON, and the errors users see."""
from __future__ import annotations

import pytest
import torch

import circuitkd.circuits as C
from circuitkd.errors import CircuitKDError
from circuitkd.types import Edge, Node

from .conftest import build, text_pairs


def test_graph_counts_edges_like_the_residual_stream():
    model = build("native")
    g = C.ComponentGraph.from_model(model)
    L, H = 2, 2
    assert g.n_sources == 1 + L * (H + 1)
    assert g.n_readers == L * (3 * H + 1) + 1
    # a head of layer l reads embed + all components of earlier layers (3 ports each)
    upstream = lambda layer: 1 + layer * (H + 1)  # noqa: E731
    expected = sum(3 * H * upstream(layer) + (upstream(layer) + H) for layer in range(L)) + g.n_sources
    assert g.n_edges == len(g.edges) == expected
    assert Edge(Node("head", 0, 1), Node("head", 1, 0), "k") in g.edges
    assert Edge(Node("head", 1, 0), Node("head", 0, 1), "q") not in g.edges
    with pytest.raises(CircuitKDError, match="backwards"):
        g.edge_cell(Edge(Node("head", 1, 0), Node("head", 0, 1), "q"))


def test_attention_only_graph_has_81_edges_for_a_2_layer_8_head_model():
    from circuitkd.config import ModelSpec
    from circuitkd.models.build import build_model

    spec = ModelSpec(backbone="native", causal=True, attn_only=True, n_layers=2, n_heads=4, d_model=32, d_vocab=10, n_ctx=8)
    g = C.ComponentGraph.from_model(build_model(spec, device="cpu"))
    # embed->12 readers of layer 0, (embed + 4 heads)->12 readers of layer 1, 9 sources->output
    assert g.n_edges == 12 + 5 * 12 + 9 == 81


def test_circuit_selection_and_json_roundtrip(tmp_path):
    g = C.ComponentGraph.from_model(build("native"))
    scores = torch.randn(g.shape)
    c = C.Circuit(g, scores, method="test", info={"note": "x"})
    assert c.n_edges == g.n_edges  # default mask: every edge
    top = c.top_k(5)
    assert top.n_edges == 5
    ranked = [abs(s) for _, s in c.top_edges(g.n_edges)]
    assert ranked == sorted(ranked, reverse=True)
    assert {e for e, _ in c.top_edges(5)} == set(top.edges)
    assert (scores.abs()[g.valid] >= 0.5).sum() == c.threshold(0.5).n_edges
    assert not bool(c.scores[~g.valid].any())  # invalid cells are zeroed
    path = tmp_path / "c.json"
    top.to_json(path)
    back = C.Circuit.from_json(path)
    assert back.graph == g and back.method == "test" and back.info["k"] == 5
    assert torch.equal(back.scores, top.scores) and torch.equal(back.mask, top.mask)
    with pytest.raises(CircuitKDError, match="k must be"):
        c.top_k(10_000)


def test_errors_name_the_problem():
    model = build("native")
    pairs = text_pairs()
    with pytest.raises(CircuitKDError, match=r"unknown circuit method 'nope'.*acdc.*eap.*eap-ig.*exact"):
        C.discover(model, pairs, method="nope")
    bad = text_pairs(pos=12)
    with pytest.raises(CircuitKDError, match="12 tokens but the model's context is 8"):
        C.discover(model, bad, method="eap")
    with pytest.raises(CircuitKDError, match="vocabulary"):
        C.discover(model, text_pairs(vocab=50), method="eap")
    other = C.ComponentGraph.from_model(build("bert"))
    circuit = C.Circuit(other, torch.zeros(other.shape))
    with pytest.raises(CircuitKDError, match="does not match the model"):
        C.faithfulness(model, pairs, circuit)
    with pytest.raises(CircuitKDError, match="another graph"):
        circuit.check_graph(C.ComponentGraph.from_model(model, level="node"))
    with pytest.raises(CircuitKDError, match="do not fit the graph"):
        C.Circuit(other, torch.zeros(3, 3))
