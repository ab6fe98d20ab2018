"""Circuit figures: the circuit graph of one model, the teacher-student difference, faithfulness
curves (MIB's CPR/CMD areas in the legend) and score heatmaps. Every function returns a
``plotly.graph_objects.Figure``; none shows it."""
from __future__ import annotations

from typing import Mapping, Optional

import plotly.graph_objects as go

from circuitkd.types import Edge, Node


def _xy(node: Node, graph) -> tuple[float, float]:
    """Node position: x = relative depth (embed 0, output 1), y = head index (MLP above the heads)."""
    if node.kind == "embed":
        return 0.0, (graph.n_heads - 1) / 2
    if node.kind == "output":
        return 1.0, (graph.n_heads - 1) / 2
    x = (node.layer + (0.4 if node.kind == "head" else 0.7)) / graph.n_layers * 0.9 + 0.05
    y = float(node.head) if node.kind == "head" else float(graph.n_heads)
    return x, y


def _edge_trace(edges, graph, color: str, name: str, widths=None) -> go.Scatter:
    xs, ys, texts = [], [], []
    for e in edges:
        x0, y0 = _xy(e.src, graph)
        x1, y1 = _xy(e.dst, graph)
        xs += [x0, x1, None]
        ys += [y0, y1, None]
        texts.append(str(e))
    width = 2.0 if widths is None else widths
    return go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=color, width=width), name=name, hoverinfo="skip")


def _node_trace(graph) -> go.Scatter:
    nodes = graph.sources + [Node("output")]
    pts = [_xy(n, graph) for n in nodes]
    return go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers+text",
                      text=[str(n) for n in nodes], textposition="top center",
                      marker=dict(size=14, color="#333"), name="components")


def _plain(edge) -> Edge:
    return edge[0] if isinstance(edge, tuple) else edge


def circuit_graph(circuit, title: Optional[str] = None) -> go.Figure:
    """The kept edges of ``circuit``, coloured by port and sized by ``|score|``."""
    graph = circuit.graph
    fig = go.Figure()
    scores = dict((_plain(e), abs(s)) for e, s in circuit.top_edges(int(circuit.valid_cells.sum())))
    top = max(scores.values(), default=1.0) or 1.0
    colors = {"q": "#1f77b4", "k": "#2ca02c", "v": "#d62728", "in": "#7f7f7f"}
    kept = [_plain(e) for e in circuit.edges]
    for port, color in colors.items():
        for e in [e for e in kept if e.port == port]:
            fig.add_trace(_edge_trace([e], graph, color, f"<{port}>", widths=1 + 6 * scores.get(e, 0) / top))
    fig.add_trace(_node_trace(graph))
    fig.update_layout(title=title or f"{circuit.method} circuit ({circuit.n_edges} edges)", showlegend=False,
                      xaxis=dict(title="relative depth", range=[-0.05, 1.05]), yaxis=dict(title="head"))
    return fig


def circuit_difference(teacher_circuit, student_circuit, comparison, title: Optional[str] = None) -> go.Figure:
    """Shared (grey), lost (red, teacher only) and new (green, student only) edges.

    Teacher edges are drawn on the teacher's layout, new edges on the student's, both against
    relative depth, so matched components line up.
    """
    fig = go.Figure()
    fig.add_trace(_edge_trace(comparison.shared, teacher_circuit.graph, "#999999", "shared"))
    fig.add_trace(_edge_trace(comparison.lost, teacher_circuit.graph, "#d62728", "lost"))
    fig.add_trace(_edge_trace(comparison.new, student_circuit.graph, "#2ca02c", "new"))
    fig.add_trace(_node_trace(teacher_circuit.graph))
    fig.update_layout(title=title or f"teacher vs student circuit ({comparison.matching})",
                      xaxis=dict(title="relative depth"), yaxis=dict(title="head"))
    return fig


def faithfulness_curves(results: Mapping[str, object], title: str = "faithfulness") -> go.Figure:
    """Faithfulness against the fraction of edges kept, one line per result (CPR/CMD in the legend)."""
    fig = go.Figure()
    for name, r in results.items():
        fig.add_trace(go.Scatter(x=r.fractions, y=r.curve, mode="lines+markers",
                                 name=f"{name} (CPR {r.cpr:.2f}, CMD {r.cmd:.2f})"))
    fig.add_hline(y=1.0, line_dash="dot")
    fig.update_layout(title=title, xaxis=dict(title="fraction of edges kept", type="log"),
                      yaxis=dict(title="normalised metric recovered"))
    return fig


def score_heatmap(circuit, title: Optional[str] = None) -> go.Figure:
    """Edge scores as a source x reader heatmap (summed over positions); node scores as a bar chart."""
    graph = circuit.graph
    scores = circuit.scores.sum(0) if graph.per_position else circuit.scores
    if graph.level == "node":
        fig = go.Figure(go.Bar(x=[str(n) for n in graph.sources], y=scores.tolist()))
    else:
        readers = [f"{n}<{p}>" if p != "in" else str(n) for n, p in graph.readers]
        fig = go.Figure(go.Heatmap(z=scores.tolist(), x=readers, y=[str(n) for n in graph.sources],
                                   colorscale="RdBu", zmid=0))
        fig.update_layout(xaxis=dict(title="reader"), yaxis=dict(title="source"))
    fig.update_layout(title=title or f"{circuit.method} scores")
    return fig
