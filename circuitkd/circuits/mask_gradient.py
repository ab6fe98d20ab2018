"""Mask-gradient integrated gradients: integrated gradients over an edge-mask interpolation, the
``mask_gradient_prune_scores(..., integrated_grad_samples=steps)`` of auto-circuit (Miller, Chughtai &
Saunders 2024; integrated gradients of Sundararajan et al. 2017).

Every edge carries a mask value ``w`` in ``[0, 1]``: the reader reads the residual stream plus
``w * (replacement_src - current_src)``, where ``current_src`` is the source's output *in this very
run* (as in :func:`circuitkd.circuits.forward.patched_forward`). All masks are set to one value
``alpha``, stepping ``alpha = k / steps`` for ``k = 0..steps`` (``steps + 1`` points, both ends of the
path included, as auto-circuit does), and the gradient of the metric with respect to each edge's
mask is averaged over the points::

    score(e) = mean_pairs 1 / (steps + 1) sum_{k = 0..steps} d metric / d w_e  at  w = (k / steps) * 1

The straight path runs from the clean run (``w = 0``) to every edge ablated (``w = 1``, the corrupt
run under corrupt ablation), so the scores sum, up to the quadrature error, to
``metric(corrupt) - metric(clean)``. At ``alpha = 0`` the mask gradient is EAP's score. auto-circuit
reports the sum over points and batches of the gradient of ``-mean logit difference``: for equal
batches its scores are these times ``-(steps + 1) * n_batches`` (the same ranking).
"""
from __future__ import annotations

from typing import Optional

import torch

from circuitkd.circuits import native_gradients
from circuitkd.circuits.base import batches
from circuitkd.circuits.forward import patched_forward
from circuitkd.circuits.gradients import check_edge_graph, check_steps
from circuitkd.circuits.graph import Circuit, ComponentGraph
from circuitkd.metrics import Metric, evaluate_metric
from circuitkd.types import PromptPairs


def mask_gradient_ig(model, pairs: PromptPairs, *, metric: Metric, graph: ComponentGraph, ablation: str = "corrupt",
                     batch_size: int = 32, steps: int = 5, steps_per_forward: Optional[int] = None,
                     mean_values: Optional[torch.Tensor] = None) -> Circuit:
    """Mask-gradient IG edge scores ``[source reader]`` (``[pos source reader]`` per position).

    Per batch ``steps + 1`` edge-patched forwards + backwards, ``steps_per_forward`` of them (default as many
    as fit :data:`~circuitkd.circuits.native_gradients.TOKENS_PER_FORWARD`, ``MASK_TOKENS_PER_FORWARD`` on the
    native path) in the batch dimension of one
    forward, copy ``k`` with every mask at its own ``alpha``; on native pre-LN models without hooks
    (:func:`circuitkd.circuits.native_gradients.mask_gradients`: ``d metric / d w[s, r]`` is source ``s``'s
    difference dotted with the gradient at reader ``r``'s input).
    """
    check_steps(steps)
    check_edge_graph(graph, "mask-gradient-ig")
    alphas = torch.arange(steps + 1, dtype=torch.float32) / steps
    if steps_per_forward is not None:
        check_steps(steps_per_forward, name="steps_per_forward")
    valid = (graph.valid.expand(graph.shape) if graph.per_position else graph.valid).float()
    total = torch.zeros(graph.shape, dtype=torch.float64)
    n = 0
    for bv in batches(model, graph, pairs, batch_size=batch_size, ablation=ablation, mean_values=mean_values):
        device = bv.replacement.device
        B, P = bv.pairs.clean.shape[:2]
        native = native_gradients.supported(model, graph, bv.pairs.clean, per_position=False)
        per = native_gradients.copies_per_forward(B, P, steps_per_forward, len(alphas),
                                                  native_gradients.MASK_TOKENS_PER_FORWARD if native else None)
        for start in range(0, len(alphas), per):
            a = alphas[start:start + per]
            K = len(a)
            if native:
                total += native_gradients.mask_gradients(model, graph, bv, metric, a.to(device)).cpu()
                continue
            masks = (a.view(K, *[1] * valid.dim()) * valid[None]).to(device).requires_grad_(True)
            with torch.enable_grad():
                run = patched_forward(model, graph, bv.pairs.clean, bv.pairs.attention_mask, ablate=masks,
                                      replacement=bv.replacement, norm_scales=bv.clean.norm_scales)
                value = evaluate_metric(metric, run.logits, bv.pairs.repeat(K), bv.clean.logits).sum()
                (grad,) = torch.autograd.grad(value, masks)
            total += grad.sum(0).double().cpu()
        n += len(bv.pairs)
    scores = total / (n * len(alphas))
    return Circuit(graph, scores.float(), method="mask-gradient-ig",
                   info={"ablation": ablation, "steps": steps, "n_pairs": n})
