"""Checking the frozen-norm edge definition on post-LN models (BERT) against real patching.

See :mod:`circuitkd.circuits.forward` for the definition. Ablating *every* outgoing edge of
a component under frozen norms is the frozen-norm version of patching that component's
output; real activation patching lets the norms rescale. :func:`validate_post_ln` compares
the two for every component on the given pairs: where they agree, edge scores on the
frozen model describe the real one; where they do not, :func:`circuitkd.circuits.discover`
falls back to node-level circuits (real patching) and says so.
"""
from __future__ import annotations

import torch

from circuitkd.circuits.base import batches
from circuitkd.circuits.graph import ComponentGraph
from circuitkd.metrics import Metric, MetricArg, evaluate_metric, resolve_metric
from circuitkd.types import PromptPairs


def node_effects(model, graph: ComponentGraph, pairs: PromptPairs, *, metric: Metric, frozen: bool,
                 ablation: str = "corrupt", batch_size: int = 32) -> torch.Tensor:
    """``[source]``: mean metric change from patching each component's output.

    ``frozen=True`` ablates all of a component's outgoing edges with norms frozen at their
    clean scales; ``frozen=False`` is real activation patching (norms run as trained).
    """
    S = graph.n_sources
    totals = torch.zeros(S, dtype=torch.float64)
    base = 0.0
    eye = torch.eye(S)
    for bv in batches(model, graph, pairs, batch_size=batch_size, ablation=ablation):
        with torch.no_grad():
            if frozen:
                w = eye[:, :, None] * graph.valid.float()[None]
                if graph.per_position:
                    w = w[:, None].expand(S, graph.n_pos, S, graph.n_readers)
                m = bv.ablated_metric(model, graph, metric, w, node_level=False)
            else:
                m = bv.ablated_metric(model, graph, metric, eye, node_level=True)
            totals += m.sum(1).cpu()
            base += float(evaluate_metric(metric, bv.clean.logits, bv.pairs, bv.clean.logits).sum())
    return ((totals - base) / len(pairs)).float()


def validate_post_ln(model, pairs: PromptPairs, *, metric: MetricArg = None, ablation: str = "corrupt",
                     tolerance: float = 0.25, batch_size: int = 32) -> dict:
    """Compare frozen-norm and real node patching on every component.

    Returns ``{"frozen", "real"}`` effects, their correlation, the relative error
    ``|frozen - real| / |real|`` (norms over components), and ``ok`` (relative error below
    ``tolerance``).
    """
    metric = resolve_metric(metric, pairs)
    graph = ComponentGraph.from_model(model)
    frozen = node_effects(model, graph, pairs, metric=metric, frozen=True, ablation=ablation, batch_size=batch_size)
    real = node_effects(model, graph, pairs, metric=metric, frozen=False, ablation=ablation, batch_size=batch_size)
    rel = float((frozen - real).norm() / real.norm().clamp_min(1e-12))
    corr = float(torch.corrcoef(torch.stack([frozen, real]))[0, 1]) if real.std() > 0 and frozen.std() > 0 else float("nan")
    return {"frozen": frozen.tolist(), "real": real.tolist(), "sources": [str(n) for n in graph.sources],
            "correlation": corr, "relative_error": rel, "ok": rel < tolerance, "tolerance": tolerance}
