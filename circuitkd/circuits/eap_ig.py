"""EAP with integrated gradients, EAP-IG (Hanna, Pezzelle & Belinkov 2024), input interpolation.

The gradient at each reader's input is averaged over ``steps`` runs whose input embedding
is interpolated from the corrupt to the clean one (``alpha = k/steps``, ``k = 1..steps``),
then contracted with ``replacement_src - clean_src``, as in EAP. The steps of a batch ride
in the batch dimension of one forward + backward (``steps_per_forward`` of them, by default as many as
fit :data:`~circuitkd.circuits.native_gradients.TOKENS_PER_FORWARD`); on native pre-LN models without
hooks (:mod:`circuitkd.circuits.native_gradients`).
"""
from __future__ import annotations

from typing import Optional

import torch

from circuitkd.circuits import native_gradients
from circuitkd.circuits.base import batches
from circuitkd.circuits.eap import scores_from_gradients
from circuitkd.circuits.gradients import add_gradients, source_deltas, summed_reader_gradients
from circuitkd.circuits.graph import Circuit, ComponentGraph
from circuitkd.errors import CircuitKDError
from circuitkd.metrics import Metric
from circuitkd.types import PromptPairs


def eap_ig(model, pairs: PromptPairs, *, metric: Metric, graph: ComponentGraph, ablation: str = "corrupt",
           batch_size: int = 32, steps: int = 5, steps_per_forward: Optional[int] = None,
           mean_values: Optional[torch.Tensor] = None) -> Circuit:
    """EAP-IG edge scores with ``steps`` interpolation steps between corrupt and clean inputs."""
    if steps < 1:
        raise CircuitKDError(f"steps must be >= 1, got {steps}")
    if graph.level != "edge":
        raise CircuitKDError("EAP-IG scores edges; use method='exact' for a node-level graph")
    total, n = None, 0
    for bv in batches(model, graph, pairs, batch_size=batch_size, ablation=ablation, mean_values=mean_values):
        B, P = bv.pairs.clean.shape[:2]
        per = native_gradients.copies_per_forward(B, P, steps_per_forward, steps)
        clean_emb = bv.clean.outputs[:, :, 0]
        corrupt_emb = bv.corrupt.outputs[:, :, 0]
        deltas = source_deltas(model, graph, bv)
        grad_sum: dict = {}
        alphas = torch.arange(1, steps + 1, dtype=clean_emb.dtype, device=clean_emb.device) / steps
        for start in range(0, steps, per):
            a = alphas[start:start + per]
            K = len(a)
            emb = corrupt_emb[None] + a.view(K, 1, 1, 1) * (clean_emb - corrupt_emb)[None]
            grads = summed_reader_gradients(model, graph, bv, metric, bv.pairs.clean, n_copies=K,
                                            norm_scales=bv.clean.norm_scales,
                                            embed_override=emb.reshape(K * B, *emb.shape[2:]))
            grad_sum = add_gradients(grad_sum, grads)
        grads = {k: v / steps for k, v in grad_sum.items()}
        s = scores_from_gradients(graph, deltas, grads)
        total = s if total is None else total + s
        n += B
    return Circuit(graph, (total / n).float(), method="eap-ig",
                   info={"ablation": ablation, "steps": steps, "n_pairs": n})


