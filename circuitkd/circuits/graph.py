"""The computational graph circuits live on, and the :class:`Circuit` every method returns.

A :class:`ComponentGraph` has one *source* per component that writes into the residual
stream (the input embedding, every attention head, every MLP) and one *reader* per
component input: each head's query, key and value inputs separately (Wang et al. 2022;
Conmy et al. 2023), each MLP's input and the classifier's input (the output). An edge
joins every source to every reader downstream of it. Scores are held in one dense
``[source, reader]`` matrix (``[pos, source, reader]`` for a per-position graph), the
layout of EAP-IG's ``Graph`` (Hanna et al. 2024), with a boolean ``valid`` matrix marking
which cells are real edges.

Post-LN models (BERT): the residual stream is not a sum of component outputs there, so
edges are defined on the model with every LayerNorm's scale frozen at its clean-run value
(each norm is then affine, and each reader's input an affine function of upstream
outputs); see :mod:`circuitkd.circuits.forward`, which documents and implements it.
A graph built with ``level="node"`` scores sources only (node-level circuits), the
fallback where the frozen-norm edges do not track real patching.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from circuitkd import hooks
from circuitkd.errors import CircuitKDError
from circuitkd.types import Edge, Node

HEAD_PORTS = ("q", "k", "v")
LEVELS = ("edge", "node")


@dataclass(frozen=True)
class ComponentGraph:
    """Sources, readers and edges of one model's residual-stream graph.

    Build one with :meth:`from_model`. Sources are ordered ``embed, heads of layer 0,
    mlp0, heads of layer 1, ...``; readers ``q/k/v of each head of layer 0 (head-major),
    mlp0, ..., output``. ``n_pos`` set means a per-position graph (an edge at each
    token position, the residual stream being position-wise).
    """

    backbone: str
    n_layers: int
    n_heads: int
    has_mlp: bool
    post_ln: bool
    n_pos: Optional[int] = None
    level: str = "edge"

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise CircuitKDError(f"unknown graph level {self.level!r}; expected one of {LEVELS}")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_model(cls, model, *, per_position: bool = False, n_pos: Optional[int] = None,
                   level: str = "edge") -> "ComponentGraph":
        """The graph of a supported bridge (native encoder or causal model, BERT, ViT, GPT-2)."""
        backbone = hooks.backbone_of(model)
        if per_position and n_pos is None:
            raise CircuitKDError("a per-position graph needs n_pos (the input length)")
        return cls(
            backbone=backbone,
            n_layers=hooks.n_layers(model),
            n_heads=hooks.n_heads(model),
            has_mlp=hooks.has_mlp(model),
            post_ln=backbone == "bert",
            n_pos=int(n_pos) if per_position else None,
            level=level,
        )

    # ------------------------------------------------------------------ structure
    @cached_property
    def sources(self) -> list[Node]:
        out = [Node("embed")]
        for layer in range(self.n_layers):
            out += [Node("head", layer, h) for h in range(self.n_heads)]
            if self.has_mlp:
                out.append(Node("mlp", layer))
        return out

    @cached_property
    def readers(self) -> list[tuple[Node, str]]:
        out: list[tuple[Node, str]] = []
        for layer in range(self.n_layers):
            out += [(Node("head", layer, h), p) for h in range(self.n_heads) for p in HEAD_PORTS]
            if self.has_mlp:
                out.append((Node("mlp", layer), "in"))
        out.append((Node("output"), "in"))
        return out

    @property
    def n_sources(self) -> int:
        return len(self.sources)

    @property
    def n_readers(self) -> int:
        return len(self.readers)

    @property
    def per_position(self) -> bool:
        return self.n_pos is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of a score matrix: ``(source, reader)``, ``(pos, source, reader)``, or ``(source,)`` at node level."""
        if self.level == "node":
            base: tuple[int, ...] = (self.n_sources,)
        else:
            base = (self.n_sources, self.n_readers)
        return ((self.n_pos,) + base) if self.per_position else base

    @staticmethod
    def _stage(node: Node) -> int:
        # Topological stage: embed 0, heads of layer l at 2l+1, the MLP of layer l at 2l+2.
        if node.kind == "embed":
            return 0
        if node.kind == "head":
            return 2 * node.layer + 1
        if node.kind == "mlp":
            return 2 * node.layer + 2
        return 10**9

    @cached_property
    def source_index(self) -> dict[Node, int]:
        return {n: i for i, n in enumerate(self.sources)}

    @cached_property
    def reader_index(self) -> dict[tuple[Node, str], int]:
        return {r: i for i, r in enumerate(self.readers)}

    @cached_property
    def valid(self) -> Tensor:
        """``Bool[source, reader]``: True where the source is upstream of the reader (a real edge)."""
        src = torch.tensor([self._stage(n) for n in self.sources])
        dst = torch.tensor([self._stage(n) for n, _ in self.readers])
        return src[:, None] < dst[None, :]

    @cached_property
    def edges(self) -> list[Edge]:
        """Every edge, in row-major ``(source, reader)`` order of the score matrix."""
        return [Edge(self.sources[s], self.readers[r][0], self.readers[r][1])
                for s, r in self.valid.nonzero().tolist()]

    @property
    def n_edges(self) -> int:
        """Edges in the graph (per position times positions for a per-position graph)."""
        n = int(self.valid.sum())
        return n * (self.n_pos or 1)

    def edge_cell(self, edge: Edge) -> tuple[int, int]:
        """``(source, reader)`` indices of ``edge`` in the score matrix."""
        try:
            s = self.source_index[edge.src]
            r = self.reader_index[(edge.dst, edge.port)]
        except KeyError:
            raise CircuitKDError(f"edge {edge} is not in this graph ({self.describe()})") from None
        if not bool(self.valid[s, r]):
            raise CircuitKDError(f"edge {edge} goes backwards: {edge.src} is not upstream of {edge.dst}")
        return s, r

    def reader_slice(self, kind: str, layer: Optional[int] = None) -> slice:
        """Reader indices of layer ``layer``'s heads (``kind="head"``; head-major, q/k/v inner),
        its MLP (``"mlp"``) or the output (``"output"``)."""
        if kind == "output":
            return slice(self.n_readers - 1, self.n_readers)
        per_layer = 3 * self.n_heads + int(self.has_mlp)
        start = layer * per_layer
        if kind == "head":
            return slice(start, start + 3 * self.n_heads)
        return slice(start + 3 * self.n_heads, start + per_layer)

    def source_slice(self, kind: str, layer: Optional[int] = None) -> slice:
        """Source indices of the embedding, layer ``layer``'s heads, or its MLP."""
        if kind == "embed":
            return slice(0, 1)
        per_layer = self.n_heads + int(self.has_mlp)
        start = 1 + layer * per_layer
        if kind == "head":
            return slice(start, start + self.n_heads)
        return slice(start + self.n_heads, start + per_layer)

    def n_sources_before(self, kind: str, layer: Optional[int] = None) -> int:
        """How many sources are upstream of layer ``layer``'s heads / MLP, or of the output."""
        if kind == "output":
            return self.n_sources
        per_layer = self.n_heads + int(self.has_mlp)
        return 1 + layer * per_layer + (self.n_heads if kind == "mlp" else 0)

    # ------------------------------------------------------------------ identity
    def key(self) -> dict[str, Any]:
        return dict(backbone=self.backbone, n_layers=self.n_layers, n_heads=self.n_heads,
                    has_mlp=self.has_mlp, post_ln=self.post_ln, n_pos=self.n_pos, level=self.level)

    def describe(self) -> str:
        pos = f", {self.n_pos} positions" if self.per_position else ""
        return (f"{self.backbone} graph, {self.n_layers} layers x {self.n_heads} heads"
                f"{'' if self.has_mlp else ', attention only'}{pos}, {self.level} level")

    def check_model(self, model) -> None:
        """Raise if ``model`` does not have this graph's shape."""
        other = ComponentGraph.from_model(model, per_position=self.per_position, n_pos=self.n_pos,
                                          level=self.level)
        if other.key() != self.key():
            raise CircuitKDError(f"the circuit's graph ({self.describe()}) does not match the model "
                                 f"({other.describe()})")

    def to_dict(self) -> dict[str, Any]:
        return self.key()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ComponentGraph":
        return cls(**data)


@dataclass
class Circuit:
    """Edge (or node) scores over a :class:`ComponentGraph`, and the mask of what is kept.

    ``scores`` has ``graph.shape``; a higher ``|score|`` means a more important edge
    (for patching-style methods the score estimates ``metric(edge ablated) - metric(clean)``).
    ``mask`` (Bool, same shape) marks the edges in the circuit; invalid cells are never set.
    """

    graph: ComponentGraph
    scores: Tensor
    mask: Optional[Tensor] = None
    method: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = self.scores.detach().float().cpu()
        if tuple(self.scores.shape) != self.graph.shape:
            raise CircuitKDError(f"scores of shape {tuple(self.scores.shape)} do not fit the graph "
                                 f"({self.graph.describe()}, expected {self.graph.shape})")
        self.scores = torch.where(self.valid_cells, self.scores, torch.zeros_like(self.scores))
        if self.mask is None:
            self.mask = self.valid_cells.clone()
        else:
            self.mask = self.mask.detach().cpu().bool()
            if self.mask.shape != self.scores.shape:
                raise CircuitKDError(f"mask of shape {tuple(self.mask.shape)} does not match scores "
                                     f"{tuple(self.scores.shape)}")
            self.mask = self.mask & self.valid_cells

    @property
    def valid_cells(self) -> Tensor:
        if self.graph.level == "node":
            valid = torch.ones(self.graph.n_sources, dtype=torch.bool)
        else:
            valid = self.graph.valid
        if self.graph.per_position:
            valid = valid.expand(self.graph.n_pos, *valid.shape)
        return valid

    # ------------------------------------------------------------------ selection
    def _ranked(self) -> Tensor:
        flat = self.scores.abs().flatten()
        flat = torch.where(self.valid_cells.flatten(), flat, torch.full_like(flat, -1.0))
        return torch.argsort(flat, descending=True, stable=True)

    def top_k_mask(self, k: int) -> Tensor:
        n_valid = int(self.valid_cells.sum())
        if not 0 <= k <= n_valid:
            raise CircuitKDError(f"k must be in [0, {n_valid}] for this graph, got {k}")
        mask = torch.zeros(self.scores.numel(), dtype=torch.bool)
        mask[self._ranked()[:k]] = True
        return mask.view(self.scores.shape)

    def top_k(self, k: int) -> "Circuit":
        """A copy keeping the ``k`` highest-``|score|`` edges."""
        return Circuit(self.graph, self.scores, self.top_k_mask(k), self.method, {**self.info, "k": k})

    def threshold(self, tau: float) -> "Circuit":
        """A copy keeping the edges with ``|score| >= tau``."""
        return Circuit(self.graph, self.scores, self.scores.abs() >= tau, self.method,
                       {**self.info, "threshold": tau})

    def _cell_label(self, idx: tuple[int, ...]):
        if self.graph.level == "node":
            *pos, s = idx
            item: Any = self.graph.sources[s]
        else:
            *pos, s, r = idx
            node, port = self.graph.readers[r]
            item = Edge(self.graph.sources[s], node, port)
        return (item, pos[0]) if pos else item

    def top_edges(self, k: int = 10) -> list[tuple[Any, float]]:
        """The ``k`` highest-``|score|`` ``(edge, score)`` pairs, strongest first.

        Per-position graphs give ``((edge, pos), score)``; node-level graphs ``(node, score)``.
        """
        out = []
        for flat in self._ranked()[:k].tolist():
            idx = tuple(torch.unravel_index(torch.tensor(flat), self.scores.shape))
            idx = tuple(int(i) for i in idx)
            out.append((self._cell_label(idx), float(self.scores[idx])))
        return out

    @property
    def edges(self) -> list:
        """The edges in the circuit (``(edge, pos)`` per position; nodes at node level)."""
        return [self._cell_label(tuple(i)) for i in self.mask.nonzero().tolist()]

    @property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    def node_scores(self) -> dict[Node, float]:
        """Each source's total outgoing score (summed over readers and positions)."""
        s = self.scores
        if self.graph.per_position:
            s = s.sum(0)
        if self.graph.level == "edge":
            s = s.sum(-1)
        return {n: float(v) for n, v in zip(self.graph.sources, s.tolist())}

    def nodes(self) -> set[Node]:
        """Nodes touched by a kept edge (the output included when anything reaches it)."""
        out: set[Node] = set()
        for item in self.edges:
            e = item[0] if isinstance(item, tuple) else item
            if isinstance(e, Edge):
                out |= {e.src, e.dst}
            else:
                out.add(e)
        return out

    def check_graph(self, graph: ComponentGraph) -> None:
        if graph.key() != self.graph.key():
            raise CircuitKDError(f"the circuit belongs to another graph: {self.graph.describe()} "
                                 f"vs {graph.describe()}")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "graph": self.graph.to_dict(),
            "method": self.method,
            "info": _jsonable(self.info),
            "scores": self.scores.tolist(),
            "mask": self.mask.int().tolist(),
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict())
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Circuit":
        missing = {"graph", "scores", "mask"} - set(data)
        if missing:
            raise CircuitKDError(f"circuit JSON lacks {sorted(missing)}")
        graph = ComponentGraph.from_dict(data["graph"])
        return cls(graph, torch.tensor(data["scores"], dtype=torch.float32),
                   torch.tensor(data["mask"], dtype=torch.bool), data.get("method", ""), data.get("info", {}))

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "Circuit":
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            p = Path(path_or_text)
            if not p.exists():
                raise CircuitKDError(f"circuit file not found: {p}")
            text = p.read_text()
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        return (f"Circuit({self.method or 'scores'}, {self.n_edges}/{int(self.valid_cells.sum())} "
                f"{'nodes' if self.graph.level == 'node' else 'edges'} kept, {self.graph.describe()})")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
