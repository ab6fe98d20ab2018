"""Exact edge patching: each edge's effect measured by ablating it alone (Wang et al. 2022;
the per-edge intervention ACDC builds on, Conmy et al. 2023).

``score(edge) = mean_pairs[ metric(clean run, only this edge ablated) - metric(clean run) ]``.
Many edges are patched per forward: ``edges_per_forward`` copies of the batch ride in the
batch dimension, copy ``k`` with edge ``k`` ablated. ``edges_per_forward=1`` is the slow,
one-edge-at-a-time reference. On native pre-LN models with token inputs the edges run through
:class:`~circuitkd.circuits.single_edge.SingleEdgeRunner` (every edge of a batch, starting at the
layer each edge enters, only the read positions in the last layer); elsewhere, and with
``edges_per_forward=1``, through the hooked :func:`~circuitkd.circuits.forward.patched_forward`.
"""
from __future__ import annotations

from typing import Optional

import torch

from circuitkd.circuits.base import batches
from circuitkd.circuits.forward import native_edge_supported
from circuitkd.circuits.graph import Circuit, ComponentGraph
from circuitkd.circuits.paths import native_allowed
from circuitkd.errors import CircuitKDError
from circuitkd.metrics import Metric, evaluate_metric
from circuitkd.types import PromptPairs

def exact(model, pairs: PromptPairs, *, metric: Metric, graph: ComponentGraph, ablation: str = "corrupt",
          batch_size: int = 32, edges_per_forward: Optional[int] = None,
          mean_values: Optional[torch.Tensor] = None) -> Circuit:
    """Score every edge (node, at node level) by patching it alone; batched over edges.

    ``edges_per_forward`` bounds the copies per forward (default: 8 on the hooked path, as many as
    a 256 MB budget of intermediates allows on the native one); 1 is the one-edge reference.
    """
    if edges_per_forward is None:
        edges_per_forward = 0
    elif edges_per_forward < 1:
        raise CircuitKDError(f"edges_per_forward must be >= 1, got {edges_per_forward}")
    node_level = graph.level == "node"
    valid = torch.ones(graph.shape, dtype=torch.bool) if node_level else \
        (graph.valid.expand(graph.shape) if graph.per_position else graph.valid)
    cells = valid.flatten().nonzero().flatten()
    totals = torch.zeros(valid.numel(), dtype=torch.float64)
    clean_total, n = 0.0, 0
    use_native = (native_allowed() and edges_per_forward != 1 and native_edge_supported(model, graph)
                  and not pairs.clean.is_floating_point())
    if not use_native:
        edges_per_forward = edges_per_forward or 8
    for bv in batches(model, graph, pairs, batch_size=batch_size, ablation=ablation, mean_values=mean_values):
        B = len(bv.pairs)
        if use_native:
            clean_total += _native_batch(model, graph, bv, metric, cells, totals, edges_per_forward)
            n += B
            continue
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


def _native_batch(model, graph: ComponentGraph, bv, metric: Metric, cells: torch.Tensor, totals: torch.Tensor,
                  edges_per_forward: int) -> float:
    """Add one batch's per-edge metric sums to ``totals`` with the single-edge runner; return the clean sum."""
    from circuitkd.circuits.single_edge import SingleEdgeRunner
    from circuitkd.metrics import read_positions

    cfg = model.cfg
    B, P = bv.pairs.clean.shape
    runner = SingleEdgeRunner(model, graph, bv.pairs.clean, bv.pairs.attention_mask, bv.clean.outputs,
                              bv.replacement, read_positions(bv.pairs, P, bv.pairs.clean.device))
    clean_read = runner.clean_logits
    clean_total = float(evaluate_metric(metric, clean_read, bv.pairs, clean_read).sum())
    d, d_mlp, H = int(cfg.d_model), int(cfg.d_mlp or 0), int(cfg.n_heads)
    chunk = max(1, int(256e6 // (B * P * max(4 * d, d_mlp, H * P) * 4 * 3)))  # copies within ~256 MB
    if edges_per_forward:
        chunk = min(chunk, edges_per_forward)
    for group in runner.groups(cells, chunk):
        K = len(group)
        logits = runner.logits(group)  # [K B d_out]
        m = evaluate_metric(metric, logits.reshape(K * B, -1), bv.pairs.repeat(K), clean_read.repeat(K, 1))
        totals[group] += m.view(K, B).sum(1).cpu()
    return clean_total
