"""Circuit figures: a teacher's and a student's circuit side by side, faithfulness curves (MIB's
CPR/CMD areas in the legend) and score heatmaps. Every function returns a
``plotly.graph_objects.Figure``; none shows it.

The circuit view (:func:`circuit_figure`) draws each model on its own grid, in the manner of the
circuit diagrams of Wang et al. 2022 and Conmy et al. 2023: columns are the embedding, the
layers and the output (information flows left to right), rows are the embedding, one row per
head index, the MLPs and the output. An edge leaves its source node and enters the destination
head at the port it reads (q, k or v, drawn as labelled stubs on the head's left side). Teacher
and student get one scale of line width (``|score|``, both in the same metric's units) and one
colour per sign; the line style says whether the matched model has the edge too.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Mapping, Optional

import plotly.graph_objects as go

from circuitkd.errors import CircuitKDError
from circuitkd.types import Edge, Node

POSITIVE, NEGATIVE = "#2166ac", "#b2182b"
#: line style of an edge by its status in the comparison
DASH = {"shared": "solid", "lost": "dot", "new": "dash"}
# Where an edge enters its destination, relative to the node: q above-left, k left, v below-left
# (the y axis runs downwards).
_PORT_OFFSET = {"q": (-0.2, -0.27), "k": (-0.25, 0.0), "v": (-0.2, 0.27), "in": (-0.22, 0.0)}
_MLP_SHIFT = 0.45  # an MLP reads its layer's heads, so it sits right of them
_GAP = 1.5  # columns between the teacher's grid and the student's


@dataclass(frozen=True)
class _Grid:
    """Where one model's components sit: ``x`` = column (shifted by ``x0``), ``y`` = row."""

    graph: object
    x0: float
    head_rows: int  # head rows of the taller model; both grids share the rows

    def xy(self, node: Node) -> tuple[float, float]:
        if node.kind == "embed":
            return self.x0, 0.0
        if node.kind == "output":
            return self.x0 + self.graph.n_layers + 1, float(self.head_rows + 2)
        if node.kind == "head":
            return self.x0 + node.layer + 1, float(node.head + 1)
        return self.x0 + node.layer + 1 + _MLP_SHIFT, float(self.head_rows + 1)

    def port_xy(self, node: Node, port: str) -> tuple[float, float]:
        x, y = self.xy(node)
        dx, dy = _PORT_OFFSET[port]
        return x + dx, y + dy

    @property
    def columns(self) -> list[tuple[float, str]]:
        n = self.graph.n_layers
        return ([(self.x0, "emb")] + [(self.x0 + la + 1, f"L{la}") for la in range(n)]
                + [(self.x0 + n + 1, "out")])

    @property
    def x_end(self) -> float:
        return self.x0 + self.graph.n_layers + 1


def _components(graph) -> list[Node]:
    return list(graph.sources) + [Node("output")]


def node_label(node: Node) -> str:
    """``head 1.2``, ``MLP 1``, ``embed``, ``output``."""
    if node.kind == "head":
        return f"head {node.layer}.{node.head}"
    if node.kind == "mlp":
        return f"MLP {node.layer}"
    return node.kind


def edge_label(edge: Edge) -> str:
    """``head 0.1 → head 1.0 (v)``: the edge, with the port it enters unless that is the only one."""
    port = f" ({edge.port})" if edge.port != "in" else ""
    return f"{node_label(edge.src)} → {node_label(edge.dst)}{port}"


def _short(node: Node) -> str:
    return {"head": f"{node.layer}.{node.head}", "mlp": f"MLP{node.layer}"}.get(node.kind, node.kind)


def kept_edges(circuit, who: str = "circuit") -> dict[Edge, float]:
    """The circuit's kept edges with their scores (summed over positions in a per-position graph)."""
    graph = circuit.graph
    if graph.level != "edge":
        raise CircuitKDError(f"the {who} circuit is node level ({graph.describe()}): the circuit view draws "
                             "edges; discover an edge-level circuit to compare")
    scores = circuit.scores.sum(0) if graph.per_position else circuit.scores
    mask = circuit.mask.any(0) if graph.per_position else circuit.mask
    return {Edge(graph.sources[s], *graph.readers[r]): float(scores[s, r]) for s, r in mask.nonzero().tolist()}


def _score_of(circuit, edge: Optional[Edge]) -> Optional[float]:
    """The edge's score in ``circuit`` (kept or not); None when the graph has no such edge."""
    if edge is None:
        return None
    graph = circuit.graph
    s, r = graph.source_index.get(edge.src), graph.reader_index.get((edge.dst, edge.port))
    if s is None or r is None or not bool(graph.valid[s, r]):
        return None
    scores = circuit.scores.sum(0) if graph.per_position else circuit.scores
    return float(scores[s, r])


def _mapped(edge: Edge, node_map) -> Optional[Edge]:
    src, dst = node_map.get(edge.src), node_map.get(edge.dst)
    return None if src is None or dst is None else Edge(src, dst, edge.port)


@dataclass(frozen=True)
class _Drawn:
    model: str  # "teacher" | "student"
    edge: Edge
    score: float
    status: str  # "shared" | "lost" | "new"
    other: Optional[Edge]  # the matched model's version of the edge, when the matching gives one
    other_score: Optional[float]  # its score there (kept or not); None when it is no edge there
    other_kept: bool


def _fmt(score: Optional[float]) -> str:
    return "—" if score is None else f"{score:+.3g}"


def _edge_hover(d: _Drawn, names: dict[str, str], matching: str) -> str:
    other = "student" if d.model == "teacher" else "teacher"
    lines = [f"<b>{html.escape(edge_label(d.edge))}</b> · {d.status}",
             f"{d.model} score {_fmt(d.score)}"]
    if d.other is None:
        lines.append(f"{other}: no counterpart (an endpoint has no matched component)")
    elif d.other_score is None:
        lines.append(f"{other}: {html.escape(edge_label(d.other))} is not an edge there "
                     "(the matched components run backwards)")
    else:
        kept = "in its circuit" if d.other_kept else "not in its circuit"
        lines.append(f"{other} score {_fmt(d.other_score)} as {html.escape(edge_label(d.other))} ({kept})")
    lines.append(f"{names['teacher']} vs {names['student']}; matching: {html.escape(matching)}")
    return "<br>".join(lines)


def _check_comparison(t_kept: dict, s_kept: dict, comparison) -> None:
    t_edges = set(comparison.shared) | set(comparison.lost)
    if t_edges != set(t_kept) or not set(comparison.new) <= set(s_kept):
        raise CircuitKDError(
            f"the comparison does not belong to these circuits: it sorts {len(t_edges)} teacher edges and "
            f"{len(comparison.new)} new student edges, the circuits keep {len(t_kept)} teacher and {len(s_kept)} "
            "student edges (compare_circuits(teacher_circuit, student_circuit) first)")


def _drawn_edges(teacher_circuit, student_circuit, comparison) -> list[_Drawn]:
    t_kept = kept_edges(teacher_circuit, "teacher")
    s_kept = kept_edges(student_circuit, "student")
    _check_comparison(t_kept, s_kept, comparison)
    node_map = comparison.node_map
    lost = set(comparison.lost)
    out = []
    for e, score in t_kept.items():
        m = _mapped(e, node_map)
        out.append(_Drawn("teacher", e, score, "lost" if e in lost else "shared", m,
                          _score_of(student_circuit, m), m in s_kept))
    back: dict[Node, list[Node]] = {}
    for t_node, s_node in node_map.items():
        if s_node is not None:
            back.setdefault(s_node, []).append(t_node)
    new = set(comparison.new)
    for e, score in s_kept.items():
        # the teacher edges that map onto this one; many-to-one matchings can give several
        candidates = [Edge(a, b, e.port) for a in back.get(e.src, []) for b in back.get(e.dst, [])]
        candidates = [(c, _score_of(teacher_circuit, c)) for c in candidates]
        real = [c for c in candidates if c[1] is not None]
        other, other_score = (max(real, key=lambda c: (c[0] in t_kept, abs(c[1]))) if real else
                              (candidates[0] if candidates else (None, None)))
        out.append(_Drawn("student", e, score, "new" if e in new else "shared", other, other_score,
                          other in t_kept))
    return out


def circuit_figure(teacher_circuit, student_circuit, comparison, *, teacher_name: str = "teacher",
                   student_name: str = "student", title: Optional[str] = None) -> go.Figure:
    """Teacher (left) and student (right) circuits, each on its own layer × component grid.

    Args:
        teacher_circuit, student_circuit: edge-level :class:`circuitkd.circuits.Circuit` s; their
            ``mask`` is what is drawn (scores summed over positions for per-position graphs).
        comparison: ``compare_circuits(teacher_circuit, student_circuit, ...)``; its ``node_map``
            (teacher Node -> student Node) links matched components and sorts edges into shared,
            lost (teacher only) and new (student only).

    Drawn: every component as a small grey dot; the circuit's components as labelled nodes;
    each kept edge from its source to the port it enters (q/k/v stubs on heads), width by
    ``|score|`` on one scale for both models, blue for a positive score and red for a negative
    one, solid when the matched model keeps it too, dotted when the student lost it, dashed
    when it is new in the student; under each node, the component of the other model it was
    matched to (``≙S0.1``: student head 0.1). Hovering an edge gives its score in each model
    and the matching used; hovering a node, its matched components.
    Every trace carries ``meta`` (``role``: components, matching, edge, ports, nodes, legend;
    ``model``) so that tests and scripts can find what was drawn.
    """
    drawn = _drawn_edges(teacher_circuit, student_circuit, comparison)
    matching = str(comparison.matching)
    names = {"teacher": teacher_name, "student": student_name}
    gt, gs = teacher_circuit.graph, student_circuit.graph
    head_rows = max(gt.n_heads, gs.n_heads)
    grids = {"teacher": _Grid(gt, 0.0, head_rows)}
    grids["student"] = _Grid(gs, grids["teacher"].x_end + _GAP, head_rows)
    top = max((abs(d.score) for d in drawn), default=0.0) or 1.0
    fig = go.Figure()

    # every component, faint, so the grid of each model reads at a glance
    for who, grid in grids.items():
        comps = _components(grid.graph)
        pts = [grid.xy(n) for n in comps]
        fig.add_trace(go.Scatter(
            x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers", showlegend=False,
            marker=dict(size=7, color="#d9d9d9", line=dict(width=0)), hoverinfo="text",
            hovertext=[f"{who} {node_label(n)} (not in the circuit)" for n in comps],
            meta={"role": "components", "model": who}))

    circuit_nodes = {who: sorted({n for d in drawn if d.model == who for n in (d.edge.src, d.edge.dst)})
                     for who in grids}
    node_map = comparison.node_map
    partners: dict[str, dict[Node, list[Node]]] = {"teacher": {}, "student": {}}
    for t_node, s_node in node_map.items():
        if s_node is not None:
            partners["teacher"].setdefault(t_node, []).append(s_node)
            partners["student"].setdefault(s_node, []).append(t_node)

    # edges, weakest first so the strongest are on top
    for d in sorted(drawn, key=lambda d: abs(d.score)):
        grid = grids[d.model]
        (x0, y0), (x1, y1) = grid.xy(d.edge.src), grid.port_xy(d.edge.dst, d.edge.port)
        x2, y2 = grid.xy(d.edge.dst)
        strength = abs(d.score) / top
        hover = _edge_hover(d, names, matching)
        fig.add_trace(go.Scatter(
            # source -> middle (which carries the hover of the line's body) -> port -> destination
            x=[x0, (x0 + x1) / 2, x1, x2], y=[y0, (y0 + y1) / 2, y1, y2], mode="lines", showlegend=False,
            line=dict(color=POSITIVE if d.score >= 0 else NEGATIVE, width=1.2 + 7 * strength, dash=DASH[d.status]),
            opacity=0.5 + 0.5 * strength, hoverinfo="text", hovertext=[hover] * 4, hoverlabel=dict(align="left"),
            meta={"role": "edge", "model": d.model, "status": d.status, "edge": str(d.edge), "src": str(d.edge.src),
                  "dst": str(d.edge.dst), "port": d.edge.port, "score": d.score,
                  "other": None if d.other is None else str(d.other), "other_score": d.other_score}))

    # the ports that edges enter, then the nodes
    for who, grid in grids.items():
        used = sorted({(d.edge.dst, d.edge.port) for d in drawn if d.model == who})
        pts = [grid.port_xy(n, p) for n, p in used]
        fig.add_trace(go.Scatter(
            x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers+text", showlegend=False,
            text=[p if p != "in" else "" for _, p in used], textposition="middle left",
            textfont=dict(size=10, color="#555"), marker=dict(size=5, color="#555"),
            customdata=[[str(n), p] for n, p in used], hoverinfo="text",
            hovertext=[f"{who} {node_label(n)}: {'its input' if p == 'in' else p + ' input'}" for n, p in used],
            meta={"role": "ports", "model": who}))
    for who, grid in grids.items():
        nodes = circuit_nodes[who]
        other = "student" if who == "teacher" else "teacher"
        pts = [grid.xy(n) for n in nodes]
        hover = []
        for n in nodes:
            n_in = sum(1 for d in drawn if d.model == who and d.edge.dst == n)
            n_out = sum(1 for d in drawn if d.model == who and d.edge.src == n)
            mates = partners[who].get(n, [])
            mate = (", ".join(node_label(m) for m in mates) if mates else "none")
            hover.append(f"<b>{who} {node_label(n)}</b><br>{n_in} circuit edges in, {n_out} out<br>"
                         f"matched {other}: {mate}<br>matching: {html.escape(matching)}")
        fig.add_trace(go.Scatter(
            x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers+text", showlegend=False,
            text=[_short(n) for n in nodes], textposition="top center", textfont=dict(size=10),
            marker=dict(size=15, color="#37474f", line=dict(color="white", width=1.5),
                        symbol=["square" if n.kind == "mlp" else "diamond" if n.kind in ("embed", "output")
                                else "circle" for n in nodes]),
            customdata=[str(n) for n in nodes], hoverinfo="text", hovertext=hover, hoverlabel=dict(align="left"),
            meta={"role": "nodes", "model": who}))
        # which component of the other model each one was matched to, under the node
        mate_text = []
        for n in nodes:
            mates = partners[who].get(n, [])
            if n.kind in ("embed", "output"):
                mate_text.append("")
            else:
                mate_text.append(f"≙{other[0].upper()} " + ", ".join(_short(m) for m in mates) if mates else "≙ none")
        fig.add_trace(go.Scatter(
            # an invisible marker of the node's size keeps the text clear of the node
            x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers+text", showlegend=False, text=mate_text,
            marker=dict(size=15, opacity=0), textposition="middle right", textfont=dict(size=9, color="#757575"),
            customdata=[str(n) for n in nodes], hoverinfo="skip",
            meta={"role": "matching", "model": who}))

    # legend entries in words: sign by colour, status by line style
    for name, color, dash in (("score > 0", POSITIVE, "solid"), ("score < 0", NEGATIVE, "solid"),
                              ("in both (solid)", "#555", DASH["shared"]),
                              ("lost: teacher only (dotted)", "#555", DASH["lost"]),
                              ("new: student only (dashed)", "#555", DASH["new"])):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=name, hoverinfo="skip",
                                 line=dict(color=color, width=3, dash=dash), meta={"role": "legend"}))

    counts = {s: sum(1 for d in drawn if d.model == ("student" if s == "new" else "teacher") and d.status == s)
              for s in DASH}
    n_teacher = counts["shared"] + counts["lost"]
    n_student = sum(1 for d in drawn if d.model == "student")
    peak = {who: max((abs(d.score) for d in drawn if d.model == who), default=0.0) for who in grids}
    head_text = {
        "teacher": f"<b>teacher</b> {html.escape(teacher_name)} · {gt.n_layers}×{gt.n_heads} heads · {n_teacher} edges, "
                   f"strongest |score| {peak['teacher']:.3g}"
                   f"<br><span style='font-size:11px;color:#555'>solid: the student has it too · dotted: lost</span>",
        "student": f"<b>student</b> {html.escape(student_name)} · {gs.n_layers}×{gs.n_heads} heads · {n_student} edges, "
                   f"strongest |score| {peak['student']:.3g}"
                   f"<br><span style='font-size:11px;color:#555'>solid: the teacher has it too · dashed: new</span>",
    }
    for who, grid in grids.items():
        fig.add_annotation(x=(grid.x0 + grid.x_end) / 2, y=1.0, xref="x", yref="paper", yanchor="bottom",
                           showarrow=False, text=head_text[who], align="center")
    split = grids["teacher"].x_end + _GAP / 2
    fig.add_shape(type="line", x0=split, x1=split, y0=0, y1=1, xref="x", yref="paper",
                  line=dict(color="#bdbdbd", width=1, dash="dash"))
    columns = grids["teacher"].columns + grids["student"].columns
    rows = ["embed"] + [f"head {h}" for h in range(head_rows)] + ["MLP", "output"]
    fig.update_xaxes(tickmode="array", tickvals=[c[0] for c in columns], ticktext=[c[1] for c in columns],
                     range=[-0.6, grids["student"].x_end + 0.6], showgrid=True, gridcolor="#f0f0f0", zeroline=False,
                     title_text="layer (information flows left → right)")
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(rows))), ticktext=rows, range=[len(rows) - 0.4, -0.7],
                     showgrid=True, gridcolor="#f0f0f0", zeroline=False)
    kept = f"{counts['shared']}/{n_teacher} teacher edges kept by the student"
    fig.update_layout(
        title=dict(text=f"{html.escape(title or 'Teacher vs student circuit')}<br><sup>{kept} · {counts['lost']} "
                        f"lost · {counts['new']} new · line width ∝ |score|, one scale for both<br>components matched "
                        f"{html.escape(matching)}</sup>", y=1.0, yanchor="top", pad=dict(t=14)),
        plot_bgcolor="white", hovermode="closest", margin=dict(t=150, l=80, r=30, b=110),
        legend=dict(orientation="h", x=0, y=-0.14, yanchor="top"),
        width=int(max(950, 95 * len(columns) + 180)), height=int(280 + 58 * len(rows)))
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
