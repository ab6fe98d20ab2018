"""Exact edge patching: each edge's effect measured by ablating it alone (Wang et al. 2022;
the per-edge intervention ACDC builds on, Conmy et al. 2023).

``score(edge) = mean_pairs[ metric(clean run, only this edge ablated) - metric(clean run) ]``.
Many edges are patched per forward: ``edges_per_forward`` copies of the batch ride in the
batch dimension, copy ``k`` with edge ``k`` ablated. ``edges_per_forward=1`` is the slow,
one-edge-at-a-time reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from circuitkd.circuits.base import batches
from circuitkd.circuits.graph import Circuit, ComponentGraph
from circuitkd.errors import CircuitKDError
from circuitkd.metrics import Metric, evaluate_metric
from circuitkd.types import PromptPairs


def exact(model, pairs: PromptPairs, *, metric: Metric, graph: ComponentGraph, ablation: str = "corrupt",
          batch_size: int = 32, edges_per_forward: int = 8, mean_values: Optional[torch.Tensor] = None) -> Circuit:
    """Score every edge (node, at node level) by patching it alone; batched over edges."""
    if edges_per_forward < 1:
        raise CircuitKDError(f"edges_per_forward must be >= 1, got {edges_per_forward}")
    node_level = graph.level == "node"
    valid = torch.ones(graph.shape, dtype=torch.bool) if node_level else \
        (graph.valid.expand(graph.shape) if graph.per_position else graph.valid)
    cells = valid.flatten().nonzero().flatten()
    totals = torch.zeros(valid.numel(), dtype=torch.float64)
    clean_total, n = 0.0, 0
    for bv in batches(model, graph, pairs, batch_size=batch_size, ablation=ablation, mean_values=mean_values):
        B = len(bv.pairs)
        with torch.no_grad():
            clean_metric = evaluate_metric(metric, bv.clean.logits, bv.pairs, bv.clean.logits)
            clean_total += float(clean_metric.sum())
            for start in range(0, len(cells), edges_per_forward):
                chunk = cells[start:start + edges_per_forward]
                C = len(chunk)
                w = torch.zeros(C, valid.numel(), device=bv.replacement.device)
                w[torch.arange(C), chunk.to(w.device)] = 1.0
                w = w.view(C, *valid.shape)
                m = bv.ablated_metric(model, graph, metric, w, node_level=node_level)
                totals[chunk] += m.sum(1).cpu()
        n += B
    scores = torch.where(valid.flatten(), totals / n - clean_total / n, torch.zeros_like(totals))
    return Circuit(graph, scores.view(valid.shape).float(), method="exact",
                   info={"ablation": ablation, "n_pairs": n, "clean_metric": clean_total / n})
