"""EAP with integrated gradients, EAP-IG (Hanna, Pezzelle & Belinkov 2024), input interpolation.

The gradient at each reader's input is averaged over ``steps`` runs whose input embedding
is interpolated from the corrupt to the clean one (``alpha = k/steps``, ``k = 1..steps``),
then contracted with ``replacement_src - clean_src``, as in EAP. All steps of a batch ride
in the batch dimension of one forward + backward (``steps_per_forward`` bounds memory).
"""
from __future__ import annotations

from typing import Optional

import torch

from circuitkd.circuits.base import batches
from circuitkd.circuits.eap import scores_from_gradients
from circuitkd.circuits.forward import patched_forward
from circuitkd.circuits.graph import Circuit, ComponentGraph
from circuitkd.errors import CircuitKDError
from circuitkd.metrics import Metric, evaluate_metric
from circuitkd.types import PromptPairs


def eap_ig(model, pairs: PromptPairs, *, metric: Metric, graph: ComponentGraph, ablation: str = "corrupt",
           batch_size: int = 32, steps: int = 5, steps_per_forward: Optional[int] = None,
           mean_values: Optional[torch.Tensor] = None) -> Circuit:
    """EAP-IG edge scores with ``steps`` interpolation steps between corrupt and clean inputs."""
    if steps < 1:
        raise CircuitKDError(f"steps must be >= 1, got {steps}")
    if graph.level != "edge":
        raise CircuitKDError("EAP-IG scores edges; use method='exact' for a node-level graph")
    per = steps_per_forward or steps
    total, n = None, 0
    for bv in batches(model, graph, pairs, batch_size=batch_size, ablation=ablation, mean_values=mean_values):
        B = len(bv.pairs)
        clean_emb = bv.clean.outputs[:, :, 0]
        corrupt_emb = bv.corrupt.outputs[:, :, 0]
        with torch.no_grad():
            record = patched_forward(model, graph, bv.pairs.clean, bv.pairs.attention_mask,
                                     replacement=bv.replacement, norm_scales=bv.clean.norm_scales,
                                     record_deltas=True)
        grad_sum: dict = {}
        alphas = torch.arange(1, steps + 1, dtype=clean_emb.dtype, device=clean_emb.device) / steps
        for start in range(0, steps, per):
            a = alphas[start:start + per]
            K = len(a)
            emb = corrupt_emb[None] + a.view(K, 1, 1, 1) * (clean_emb - corrupt_emb)[None]
            with torch.enable_grad():
                run = patched_forward(model, graph, bv.pairs.clean, bv.pairs.attention_mask,
                                      norm_scales=bv.clean.norm_scales,
                                      reader_grads=True, embed_override=emb.reshape(K * B, *emb.shape[2:]),
                                      n_copies=K)
                value = evaluate_metric(metric, run.logits, bv.pairs.repeat(K), bv.clean.logits).sum()
                keys = list(run.leaves)
                grads = torch.autograd.grad(value, [run.leaves[k] for k in keys], allow_unused=True)
            for k, g in zip(keys, grads):
                g = torch.zeros_like(run.leaves[k]) if g is None else g
                g = g.view(K, B, *g.shape[1:]).sum(0)
                grad_sum[k] = g if k not in grad_sum else grad_sum[k] + g
        grads = {k: v / steps for k, v in grad_sum.items()}
        s = scores_from_gradients(graph, record.deltas, grads, graph.n_heads)
        total = s if total is None else total + s
        n += B
    return Circuit(graph, (total / n).float(), method="eap-ig",
                   info={"ablation": ablation, "steps": steps, "n_pairs": n})


