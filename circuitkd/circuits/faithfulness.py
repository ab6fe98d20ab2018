"""Circuit faithfulness: keep a circuit's edges, ablate the rest, measure what is recovered.

``faithfulness = (m(circuit) - m(empty)) / (m(full) - m(empty))``, where ``m(full)`` is the
clean model's metric and ``m(empty)`` the metric with every edge ablated (the corrupt run,
for corrupt-activation ablation of a pre-LN model). Curves sweep the circuit size (top-k
edges by ``|score|``); their areas are MIB's circuit performance ratio (CPR, area under the
faithfulness curve; higher is better) and circuit-model distance (CMD, area under
``|1 - faithfulness|``; lower is better), Mueller et al. 2025 (MIB), computed with the
trapezoid rule over the fraction of edges kept. All circuit sizes are evaluated in
batched forwards (one copy of the batch per size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from circuitkd.circuits.base import batches
from circuitkd.circuits.graph import Circuit
from circuitkd.engine import check_pairs
from circuitkd.errors import CircuitKDError
from circuitkd.metrics import Metric, MetricArg, resolve_metric
from circuitkd.types import PromptPairs

#: MIB's circuit sizes, as fractions of the graph's edges.
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class FaithfulnessResult:
    """Faithfulness of ``circuit`` itself and of its top-k sub-circuits over ``sizes``."""

    recovered: float
    full_metric: float
    empty_metric: float
    circuit_metric: float
    sizes: list
    fractions: list
    curve: list
    cpr: float
    cmd: float
    ablation: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def masked_metrics(model, pairs: PromptPairs, circuit: Circuit, masks: torch.Tensor, *, metric: Metric,
                   ablation: str = "corrupt", batch_size: int = 32, masks_per_forward: int = 16,
                   mean_values: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean metric with each keep-mask in ``masks [K *graph.shape]`` applied (all else ablated)."""
    graph = circuit.graph
    totals = torch.zeros(masks.shape[0], dtype=torch.float64)
    for bv in batches(model, graph, pairs, batch_size=batch_size, ablation=ablation, mean_values=mean_values):
        for start in range(0, masks.shape[0], masks_per_forward):
            chunk = masks[start:start + masks_per_forward]
            K = chunk.shape[0]
            w = (~chunk).float().to(bv.replacement.device)
            with torch.no_grad():
                m = bv.ablated_metric(model, graph, metric, w, node_level=graph.level == "node")
            totals[start:start + K] += m.sum(1).cpu()
    return totals / len(pairs)


def faithfulness(model, pairs: PromptPairs, circuit: Circuit, *, metric: MetricArg = None,
                 ablation: str = "corrupt", fractions: Sequence[float] = MIB_FRACTIONS, batch_size: int = 32,
                 masks_per_forward: int = 16) -> FaithfulnessResult:
    """Faithfulness of ``circuit`` (its mask) and the curve over top-k sizes, with CPR and CMD."""
    metric = resolve_metric(metric, pairs)
    check_pairs(model, pairs)
    circuit.graph.check_model(model)
    n_valid = int(circuit.valid_cells.sum())
    for f in fractions:
        if not 0 < f <= 1:
            raise CircuitKDError(f"circuit sizes are fractions in (0, 1], got {f}")
    sizes = sorted({max(1, round(f * n_valid)) for f in fractions} | {0})
    valid = circuit.valid_cells
    masks = [valid, torch.zeros_like(valid), circuit.mask] + [circuit.top_k_mask(k) for k in sizes]
    values = masked_metrics(model, pairs, circuit, torch.stack(masks), metric=metric, ablation=ablation,
                            batch_size=batch_size, masks_per_forward=masks_per_forward)
    full, empty, own = float(values[0]), float(values[1]), float(values[2])
    gap = full - empty
    if abs(gap) < 1e-12:
        raise CircuitKDError("the full model and the fully ablated model give the same metric: "
                             "faithfulness is undefined (do the clean and corrupt inputs differ?)")
    curve = ((values[3:] - empty) / gap).tolist()
    x = torch.tensor([k / n_valid for k in sizes], dtype=torch.float64)
    y = torch.tensor(curve, dtype=torch.float64)
    cpr = float(torch.trapezoid(y, x))
    cmd = float(torch.trapezoid((1 - y).abs(), x))
    return FaithfulnessResult(recovered=(own - empty) / gap, full_metric=full, empty_metric=empty,
                              circuit_metric=own, sizes=sizes, fractions=x.tolist(), curve=curve,
                              cpr=cpr, cmd=cmd, ablation=ablation)
