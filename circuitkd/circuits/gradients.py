"""Pieces the integrated-gradient circuit methods share: the source differences an edge score
contracts with, the reader-input gradients of a patched forward summed over its copies, and the
checks of a step count (EAP, Syed et al. 2023; EAP-IG, Hanna et al. 2024; MIB's circuit track,
Mueller et al. 2025)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from circuitkd.circuits import native_gradients
from circuitkd.circuits.base import BatchValues
from circuitkd.circuits.forward import SourceValues, patched_forward
from circuitkd.circuits.graph import ComponentGraph
from circuitkd.errors import CircuitKDError
from circuitkd.metrics import evaluate_metric


def check_steps(steps, *, name: str = "steps", minimum: int = 1) -> int:
    """``steps`` as an int, or :class:`CircuitKDError` naming it when it is not a whole number >= ``minimum``."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise CircuitKDError(f"{name} must be a whole number >= {minimum}, got {steps!r}")
    if steps < minimum:
        raise CircuitKDError(f"{name} must be >= {minimum}, got {steps}")
    return steps


def check_edge_graph(graph: ComponentGraph, method: str) -> None:
    if graph.level != "edge":
        raise CircuitKDError(f"{method} scores edges; use method='exact' for a node-level graph")


def source_deltas(model, graph: ComponentGraph, bv: BatchValues, *, inputs: Optional[Tensor] = None,
                  base: Optional[SourceValues] = None, replacement: Optional[Tensor] = None) -> dict:
    """Each reader group's ``replacement_src - base_src`` as that reader sees it: ``[batch pos S_before d_model]``
    keyed like :func:`patched_forward`'s deltas (on post-LN models carried through the frozen base-run norms).

    ``inputs``/``base``/``replacement`` default to the clean input, its source values and ``bv.replacement``
    (denoising EAP passes the corrupt run and the clean outputs).
    """
    inputs = bv.pairs.clean if inputs is None else inputs
    base = bv.clean if base is None else base
    replacement = bv.replacement if replacement is None else replacement
    if native_gradients.supported(model, graph, inputs):
        # pre-LN: a reader sees each source's own difference (no norm between them)
        D = replacement.to(base.outputs.dtype) - base.outputs
        out: dict = {}
        for layer in range(graph.n_layers):
            out[("attn", layer)] = D[:, :, :graph.n_sources_before("head", layer)]
            if graph.has_mlp:
                out[("mlp", layer)] = D[:, :, :graph.n_sources_before("mlp", layer)]
        out["output"] = D
        return out
    with torch.no_grad():
        return patched_forward(model, graph, inputs, bv.pairs.attention_mask, replacement=replacement,
                               norm_scales=base.norm_scales, record_deltas=True).deltas


def summed_reader_gradients(model, graph: ComponentGraph, bv: BatchValues, metric, inputs: Tensor, *,
                            n_copies: int = 1, norm_scales: Optional[dict] = None,
                            embed_override: Optional[Tensor] = None) -> dict:
    """``d sum(metric) / d (reader input)`` for ``n_copies`` copies of ``inputs`` in one forward, summed over
    the copies: ``{key: [batch pos ...]}`` keyed like :func:`patched_forward`'s leaves (``(layer, "q"|"k"|"v")``
    ``[batch pos head d_model]``, ``(layer, "mlp")`` and ``"output"`` ``[batch pos d_model]``).

    ``embed_override`` (``[copies*batch pos d_model]``) replaces the embedding; ``norm_scales`` freezes a
    post-LN model's norms. The metric of copy ``k`` compares with ``bv.clean.logits`` (for KL-style metrics).
    Native pre-LN models take the hook-free path (:mod:`circuitkd.circuits.native_gradients`); others the
    hooked :func:`patched_forward` with a zero leaf on every reader input.
    """
    if native_gradients.supported(model, graph, inputs):
        return native_gradients.reader_gradients(model, graph, bv, metric, inputs, n_copies=n_copies,
                                                 embed=embed_override)
    return hooked_reader_gradients(model, graph, bv, metric, inputs, n_copies=n_copies, norm_scales=norm_scales,
                                   embed_override=embed_override)


def hooked_reader_gradients(model, graph: ComponentGraph, bv: BatchValues, metric, inputs: Tensor, *,
                            n_copies: int = 1, norm_scales: Optional[dict] = None,
                            embed_override: Optional[Tensor] = None) -> dict:
    """:func:`summed_reader_gradients` through the bridge's hooks (any backbone; forward hooks the
    caller has added stay in force): a zero leaf on every reader input of :func:`patched_forward`."""
    K, B = n_copies, len(bv.pairs)
    with torch.enable_grad():
        run = patched_forward(model, graph, inputs, bv.pairs.attention_mask, reader_grads=True, n_copies=K,
                              norm_scales=norm_scales, embed_override=embed_override)
        value = evaluate_metric(metric, run.logits, bv.pairs.repeat(K), bv.clean.logits).sum()
        keys = list(run.leaves)
        grads = torch.autograd.grad(value, [run.leaves[k] for k in keys], allow_unused=True)
    out = {}
    for key, grad in zip(keys, grads):
        grad = torch.zeros_like(run.leaves[key]) if grad is None else grad
        out[key] = grad.view(K, B, *grad.shape[1:]).sum(0)
    return out


def add_gradients(total: dict, grads: dict) -> dict:
    """``total + grads`` key by key (``total`` may be empty)."""
    return {k: grads[k] if k not in total else total[k] + grads[k] for k in grads}
