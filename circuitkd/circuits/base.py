"""Plumbing shared by the circuit methods: batching, and
the replacement values an ablated edge carries (corrupt-activation, mean or zero ablation)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

from circuitkd.circuits.forward import SourceValues, patched_forward, source_values
from circuitkd.circuits.graph import ComponentGraph
from circuitkd.engine import pair_batches
from circuitkd.errors import CircuitKDError
from circuitkd.models.build import model_device
from circuitkd.types import PromptPairs

ABLATIONS = ("corrupt", "mean", "zero")


@dataclass
class BatchValues:
    """One batch of pairs with its clean and corrupt source values and the replacement to use."""

    pairs: PromptPairs
    clean: SourceValues
    corrupt: SourceValues
    replacement: Tensor

    def ablated_metric(self, model, graph: ComponentGraph, metric, weights: Tensor, *, node_level: bool) -> Tensor:
        """``[copies, batch]`` metric with each copy's ``weights`` ablated.

        ``weights`` is ``[copies, *graph.shape]`` over edges (frozen norm scales on post-LN
        models), or ``[copies, source]`` over node outputs when ``node_level``.
        """
        from circuitkd.metrics import evaluate_metric

        if node_level:
            run = patched_forward(model, graph, self.pairs.clean, self.pairs.attention_mask,
                                  node_ablate=weights, replacement=self.replacement)
        else:
            run = patched_forward(model, graph, self.pairs.clean, self.pairs.attention_mask, ablate=weights,
                                  replacement=self.replacement, norm_scales=self.clean.norm_scales)
        copies = weights.shape[0]
        return evaluate_metric(metric, run.logits, self.pairs.repeat(copies),
                               self.clean.logits).view(copies, len(self.pairs))


def batches(model, graph: ComponentGraph, pairs: PromptPairs, *, batch_size: int,
            ablation: str = "corrupt", mean_values: Optional[Tensor] = None) -> Iterator[BatchValues]:
    """Batches of ``pairs`` on the model's device with clean/corrupt source values."""
    if ablation not in ABLATIONS:
        raise CircuitKDError(f"unknown ablation {ablation!r}; expected one of {ABLATIONS}")
    device = model_device(model)
    if ablation == "mean" and mean_values is None:
        mean_values = mean_source_values(model, graph, pairs, batch_size=batch_size)
    for part in pair_batches(pairs, batch_size, device):
        clean = source_values(model, graph, part.clean, part.attention_mask)
        corrupt = source_values(model, graph, part.corrupt, part.attention_mask)
        if ablation == "corrupt":
            rep = corrupt.outputs
        elif ablation == "mean":
            rep = mean_values.to(device)
        else:
            rep = torch.zeros_like(clean.outputs[:1])
        yield BatchValues(part, clean, corrupt, rep)


def mean_source_values(model, graph: ComponentGraph, pairs: PromptPairs, *, batch_size: int = 32,
                       which: str = "corrupt") -> Tensor:
    """``[1 pos source d_model]``: each source's output averaged over the pairs' ``which`` inputs."""
    device = model_device(model)
    total, n = None, 0
    for part in pair_batches(pairs, batch_size, device):
        vals = source_values(model, graph, getattr(part, which), part.attention_mask).outputs
        total = vals.sum(0, keepdim=True) if total is None else total + vals.sum(0, keepdim=True)
        n += vals.shape[0]
    return total / n
