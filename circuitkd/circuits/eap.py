"""Edge attribution patching, EAP (Syed, Rager & Conmy 2023).

A first-order estimate of every edge's patching effect from two forwards and one backward
per batch: ``score(src -> dst) = (replacement_src - base_src) . d metric / d input_dst``,
summed over positions and averaged over pairs. ``direction="noise"`` (default) takes the
gradient on the clean run and estimates ``metric(edge ablated) - metric(clean)``;
``direction="denoise"`` takes it on the corrupt run with ``clean - corrupt`` differences
(TransformerLens' ``attribution_patch`` convention).
"""
from __future__ import annotations

from typing import Optional

import torch

from circuitkd.circuits.base import batches
from circuitkd.circuits.graph import HEAD_PORTS, Circuit, ComponentGraph
from circuitkd.errors import CircuitKDError
from circuitkd.metrics import Metric
from circuitkd.types import Direction, PromptPairs



def scores_from_gradients(graph: ComponentGraph, deltas: dict, grads: dict) -> torch.Tensor:
    """Contract each reader group's source differences with its input gradients.

    ``deltas[group]``: ``[N pos S_before d]``; ``grads``: reader-input gradients keyed like
    :func:`patched_forward`'s leaves. Returns the summed (not averaged) score matrix.
    """
    P = next(iter(deltas.values())).shape[1]
    out = torch.zeros((P, graph.n_sources, graph.n_readers), dtype=torch.float64)

    def put(readers: slice, delta, grad):
        """``delta`` ``[N pos s d]`` with ``grad`` ``[N pos r d]``, summed over examples (and positions) and
        ``d_model``: one matmul over the flattened sum axes, in float64."""
        s, r = delta.shape[2], grad.shape[2]
        if graph.per_position:
            val = torch.einsum("npsd,nprd->psr", delta.double(), grad.double()).cpu()
            out[:, :s, readers] += val
        else:
            dm = delta.double().permute(2, 0, 1, 3).reshape(s, -1)
            gm = grad.double().permute(2, 0, 1, 3).reshape(r, -1)
            out[0, :s, readers] += (dm @ gm.T).cpu()

    for layer in range(graph.n_layers):
        # readers head-major with q/k/v inner, as the score matrix orders them
        heads = torch.stack([grads[(layer, port)] for port in HEAD_PORTS], 3).flatten(2, 3)  # [N pos 3H d]
        put(graph.reader_slice("head", layer), deltas[("attn", layer)], heads)
        if graph.has_mlp:
            put(graph.reader_slice("mlp", layer), deltas[("mlp", layer)], grads[(layer, "mlp")][:, :, None])
    put(graph.reader_slice("output"), deltas["output"], grads["output"][:, :, None])
    return out if graph.per_position else out[0]


def eap(model, pairs: PromptPairs, *, metric: Metric, graph: ComponentGraph, ablation: str = "corrupt",
        batch_size: int = 32, direction: Direction | str = Direction.NOISE, mean_values: Optional[torch.Tensor] = None) -> Circuit:
    """EAP edge scores: one clean (or corrupt) forward + backward and one other forward per batch."""
    from circuitkd.circuits.gradients import source_deltas, summed_reader_gradients

    direction = Direction.parse(direction)
    if graph.level != "edge":
        raise CircuitKDError("EAP scores edges; use method='exact' for a node-level graph")
    if direction is Direction.DENOISE and ablation != "corrupt":
        raise CircuitKDError("denoising EAP patches clean activations into the corrupt run: ablation must be 'corrupt'")
    total, n = None, 0
    for bv in batches(model, graph, pairs, batch_size=batch_size, ablation=ablation, mean_values=mean_values):
        if direction is Direction.NOISE:
            base, base_vals, rep = bv.pairs.clean, bv.clean, bv.replacement
        else:
            base, base_vals, rep = bv.pairs.corrupt, bv.corrupt, bv.clean.outputs
        deltas = source_deltas(model, graph, bv, inputs=base, base=base_vals, replacement=rep)
        grads = summed_reader_gradients(model, graph, bv, metric, base, norm_scales=base_vals.norm_scales)
        s = scores_from_gradients(graph, deltas, grads)
        total = s if total is None else total + s
        n += len(bv.pairs)
    return Circuit(graph, (total / n).float(), method="eap",
                   info={"ablation": ablation, "direction": direction, "n_pairs": n})
