"""Teacher-vs-student circuit comparison: match components across models, then sort edges into
shared, lost (teacher only) and new (student only), and name each model's shortcut circuit.

Teacher and student differ in depth (and possibly head count), so components are matched
either by *function* (a ``matching`` dict ``teacher Node -> student Node``, e.g. from the
attention analysis' head matching by pattern similarity) or, by default, by *relative
depth*: teacher layer ``l`` of ``L_t`` goes to student layer ``floor((l + 0.5) / L_t * L_s)``,
a head keeps its index when the student has it, MLPs go to MLPs. The report says which
matching it used. When the circuits were discovered on pairs that flip the shortcut
(bias-aligned vs bias-conflicting inputs), each circuit's kept edges are the edges that
carry that difference: its *shortcut circuit*.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from circuitkd.circuits.graph import Circuit
from circuitkd.errors import CircuitKDError
from circuitkd.types import Edge, Node


@dataclass
class CircuitComparison:
    matching: str
    node_map: dict
    shared: list
    lost: list
    new: list
    teacher_shortcut: list
    student_shortcut: list
    verdicts: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "matching": self.matching,
            "node_map": {str(k): (None if v is None else str(v)) for k, v in self.node_map.items()},
            "shared": [str(e) for e in self.shared], "lost": [str(e) for e in self.lost],
            "new": [str(e) for e in self.new],
            "teacher_shortcut": [(str(e), s) for e, s in self.teacher_shortcut],
            "student_shortcut": [(str(e), s) for e, s in self.student_shortcut],
            "verdicts": list(self.verdicts),
        }


def head_matching(teacher: Circuit, student: Circuit,
                  pairs: list[tuple[tuple[int, int], tuple[int, int], float]]) -> dict[Node, Optional[Node]]:
    """Teacher node -> student node with heads matched by function: ``pairs`` of
    ``((teacher layer, head), (student layer, head), similarity)`` as
    :attr:`circuitkd.attention.AttentionDiff.matching` holds them. Unmatched teacher heads map
    to None; the embedding, MLPs and output keep the relative-depth matching."""
    out = depth_matching(teacher, student)
    for node in out:
        if node.kind == "head":
            out[node] = None
    for (tl, th), (sl, sh), _ in pairs:
        out[Node("head", tl, th)] = Node("head", sl, sh)
    return out


def depth_matching(teacher: Circuit, student: Circuit) -> dict[Node, Optional[Node]]:
    """Teacher node -> student node by relative depth (heads keep their index where it exists)."""
    gt, gs = teacher.graph, student.graph
    out: dict[Node, Optional[Node]] = {}
    for node in gt.sources + [Node("output")]:
        if node.kind in ("embed", "output"):
            out[node] = node
            continue
        layer = min(gs.n_layers - 1, int((node.layer + 0.5) / gt.n_layers * gs.n_layers))
        if node.kind == "mlp":
            out[node] = Node("mlp", layer) if gs.has_mlp else None
        else:
            out[node] = Node("head", layer, node.head) if node.head < gs.n_heads else None
    return out


def _edges(circuit: Circuit) -> list[Edge]:
    if circuit.graph.level != "edge":
        raise CircuitKDError("compare_circuits compares edge-level circuits; this one is node level")
    return [e[0] if isinstance(e, tuple) else e for e in circuit.edges]


def _map_edge(edge: Edge, node_map) -> Optional[Edge]:
    src, dst = node_map.get(edge.src), node_map.get(edge.dst)
    if src is None or dst is None:
        return None
    return Edge(src, dst, edge.port)


def compare_circuits(teacher_circuit: Circuit, student_circuit: Circuit, *,
                     matching: Optional[dict] = None, shortcut_k: int = 5,
                     matching_name: Optional[str] = None) -> CircuitComparison:
    """Shared, lost and new edges between a teacher's and a student's circuit, with verdicts.

    ``matching``: teacher :class:`Node` -> student Node (or None); by relative depth when None.
    ``matching_name`` says how it was made, for the verdicts (e.g. "heads by attention pattern").
    """
    if teacher_circuit.graph.per_position != student_circuit.graph.per_position:
        raise CircuitKDError("compare circuits of the same kind: both per-position or both not")
    node_map = matching if matching is not None else depth_matching(teacher_circuit, student_circuit)
    how = matching_name or ("by function (given matching)" if matching is not None else "by relative depth")
    t_edges, s_edges = set(_edges(teacher_circuit)), set(_edges(student_circuit))
    mapped = {e: _map_edge(e, node_map) for e in t_edges}
    shared = sorted(e for e, m in mapped.items() if m is not None and m in s_edges)
    lost = sorted(e for e, m in mapped.items() if m is None or m not in s_edges)
    hit = {m for m in mapped.values() if m is not None}
    new = sorted(e for e in s_edges if e not in hit)

    def shortcut(c: Circuit):
        kept = [(e, s) for e, s in c.top_edges(int(c.valid_cells.sum())) if
                (e[0] if isinstance(e, tuple) else e) in set(_edges(c))]
        return kept[:shortcut_k]

    t_short, s_short = shortcut(teacher_circuit), shortcut(student_circuit)
    verdicts = [f"components matched {how}"]
    n_t = max(1, len(t_edges))
    verdicts.append(f"{len(shared)}/{len(t_edges)} teacher edges survive in the student "
                    f"({100 * len(shared) / n_t:.0f}%); {len(lost)} lost, {len(new)} new")
    if t_short:
        verdicts.append(f"teacher's shortcut path is led by {t_short[0][0]} (score {t_short[0][1]:+.3g})")
    if s_short:
        verdicts.append(f"student's shortcut path is led by {s_short[0][0]} (score {s_short[0][1]:+.3g})")
    if t_short and s_short:
        lead = _map_edge(t_short[0][0] if isinstance(t_short[0][0], Edge) else t_short[0][0][0], node_map)
        same = lead is not None and lead == (s_short[0][0] if isinstance(s_short[0][0], Edge) else s_short[0][0][0])
        verdicts.append("the student routes the shortcut through the teacher's leading edge" if same else
                        "the student's leading shortcut edge is not the teacher's: the mechanism moved")
    return CircuitComparison(how, node_map, shared, lost, new, t_short, s_short, verdicts)
