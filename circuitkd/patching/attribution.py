"""Attribution patching (Nanda 2023, "Attribution Patching: Activation Patching At Industrial
Scale"): the first-order estimate ``∂m/∂a · (a_source − a_base)`` of every component at once."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from circuitkd.engine import check_pairs, forward, model_device, pair_batches
from circuitkd.hooks import Site, capture_hooks, edit_hooks, n_heads, n_layers
from circuitkd.metrics import MetricArg, evaluate_metric, read_positions, readout, resolve_metric
from circuitkd.patching.hooked import capture_batch
from circuitkd.patching.sites import (
    PatchSite, check_kind, direction_inputs, get_site, make_cells, n_positions, normalise_effect,
)
from circuitkd.types import Direction, PromptPairs


def attribution_patch(
    model,
    pairs: PromptPairs,
    site: str = "head",
    metric: MetricArg = None,
    *,
    direction: Direction | str = Direction.DENOISE,
    normalise: bool = True,
    batch_size: int = 64,
    layers: Optional[Sequence[int]] = None,
    heads: Optional[Sequence[int]] = None,
    positions: Optional[Sequence[int]] = None,
) -> Tensor:
    """Attribution patching (Nanda 2023): ``∂m/∂a · (a_source − a_base)`` for every component at once.

    The first-order estimate of :func:`patch`'s result for the same ``site`` (same axes,
    same normalisation), from one forward and one backward on the base run (plus one
    forward on the source run) per batch. Sums run over the activation's feature axes
    (and over positions / source positions for the ``[layer head]`` and ``[layer]`` forms).
    ``site``, ``metric``, ``direction``, ``normalise``, ``layers``, ``heads`` and ``positions`` mean
    what they mean in :func:`~circuitkd.patching.patch`. The model's parameter gradients are left
    as they were (the gradients are taken with ``torch.autograd.grad``).

    Returns:
        ``Float[Tensor, "layer head pos"]`` (or the site's axes), restricted to ``layers``/``heads``/``positions``.
    """
    check_pairs(model, pairs)
    direction = Direction.parse(direction)
    ps = get_site(site)
    check_kind(model, ps)
    metric_fn = resolve_metric(metric, pairs)
    L, H = n_layers(model), n_heads(model)
    P = n_positions(model, pairs)
    device = model_device(model)
    cells, grids = make_cells(ps, L, H, P, layers, heads, positions)  # validates the restriction
    sites = [Site(i, ps.kind) for i in grids[0]]
    total = torch.zeros((len(sites),) + ((H,) if ps.by_head else ()) + ((P,) if ps.by_pos else ()), dtype=torch.float64)
    m_base_sum = m_src_sum = 0.0
    for sub in pair_batches(pairs, batch_size, device):
        base_in, src_in = direction_inputs(sub, direction)
        mask = sub.attention_mask
        r = read_positions(sub, P, device)
        src_out, src_store = capture_batch(model, src_in, mask, sites)
        store: dict = {}
        with torch.enable_grad(), edit_hooks(model, capture_hooks(model, sites, store, attention_mask=mask, grad=True)):
            base_logits = readout(forward(model, base_in, mask), r)
            src_logits = readout(src_out, r).clone()
            clean_logits = src_logits if direction is Direction.DENOISE else base_logits.detach()
            m = evaluate_metric(metric_fn, base_logits, sub, clean_logits)
            in_graph = [i for i, s in enumerate(sites) if store[s].requires_grad]  # derived sites are not
            grads = torch.autograd.grad(m.sum(), [store[sites[i]] for i in in_graph], allow_unused=True)
        for i, grad in zip(in_graph, grads):
            s = sites[i]
            if grad is None:
                continue
            contrib = (grad * (src_store[s] - store[s].detach())).double()
            total[i] += _reduce_attr(contrib, ps).cpu()
        m_base_sum += float(m.detach().sum())
        m_src_sum += float(evaluate_metric(metric_fn, src_logits, sub, clean_logits).sum())
    n = len(pairs)
    est = total / n
    if ps.by_head:
        est = est[:, grids[1]]
    if ps.by_pos:
        est = est[..., grids[-1]]
    m_base, m_src = m_base_sum / n, m_src_sum / n
    if not normalise:
        return (m_base + est).float()
    m_clean, m_corrupt = (m_src, m_base) if direction is Direction.DENOISE else (m_base, m_src)
    return normalise_effect(m_base + est, m_clean, m_corrupt).float()


def _reduce_attr(contrib: Tensor, ps: PatchSite) -> Tensor:
    """Sum an activation-shaped contribution over the batch and feature axes to the site's cells."""
    k = ps.kind
    if k in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
        per_pos = contrib.sum(dim=(0, 2))  # [P]
        return per_pos if ps.by_pos else per_pos.sum()
    if k in ("z", "q", "k", "v"):
        per = contrib.sum(dim=(0, 3)).T  # [H, P]
    else:  # pattern [B,H,dest,src]
        per = contrib.sum(dim=(0, 3))  # [H, dest]
    return per if ps.by_pos else per.sum(-1)


def correlation(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two effect tensors (NaNs dropped), e.g. attribution vs exact patching."""
    a, b = a.flatten().double(), b.flatten().double()
    keep = ~(a.isnan() | b.isnan())
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))
