"""Node-level activation patching over sites of one model, or from a teacher into a student."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from circuitkd import native
from circuitkd.engine import check_pairs, forward, model_device, pair_batches
from circuitkd.errors import CircuitKDError
from circuitkd.hooks import Site, backbone_of, n_heads, n_layers
from circuitkd.metrics import MetricArg, evaluate_metric, read_positions, readout, resolve_metric
from circuitkd.patching.fast import SourceActs, fast_chunk, run_fast
from circuitkd.patching.hooked import (
    DELTA_READ, capture_batch, cell_hook_kind, reference_batch, source_sites, stack_rows, stacked_batch,
)
from circuitkd.patching.sites import (
    check_cross, check_kind, direction_inputs, get_site, make_cells, n_positions, normalise_effect,
)
from circuitkd.types import Direction, PromptPairs


@dataclass
class PatchResult:
    """Everything one patching sweep measured (:func:`patch_result`, :func:`cross_patch`).

    ``values``: the (normalised) effects over ``axes``; ``raw``: mean patched metric;
    ``clean``/``corrupt``: mean metric of the unpatched runs (for cross-model patching: the
    teacher's and the student's runs); ``index``: the layer/head/pos values of each axis;
    ``method``: the executor that ran (``fast``, ``stacked`` or ``reference``).
    """

    values: Tensor
    raw: Tensor
    clean: float
    corrupt: float
    axes: tuple[str, ...]
    index: list
    method: str


def patch_result(
    model,
    pairs: PromptPairs,
    site: str = "head",
    metric: MetricArg = None,
    *,
    direction: Direction | str = Direction.DENOISE,
    normalise: bool = True,
    batch_size: int = 64,
    method: str = "auto",
    layers: Optional[Sequence[int]] = None,
    heads: Optional[Sequence[int]] = None,
    positions: Optional[Sequence[int]] = None,
    copies_per_forward: Optional[int] = None,
) -> PatchResult:
    """Node-level activation patching, with everything it measured: the effect of each component
    over ``(layer[, head][, pos])`` (``.values``), the raw patched metric and the unpatched runs'.

    Args:
        model: any supported bridge (native encoder or causal model, BERT, ViT).
        pairs: clean/corrupt inputs of one shape with answers and the read-out position.
        site: one of :data:`SITES` — ``"head"`` (each head's output, all positions: ``[layer head]``),
            ``"head_pos"`` (``[layer head pos]``), ``"resid"``/``"resid_pre"``/``"resid_mid"``/``"resid_post"``
            (``[layer pos]``), ``"attn_out"``/``"mlp_out"`` (``[layer pos]``), ``"attn_out_layer"``/``"mlp_out_layer"``
            (``[layer]``), ``"q" "k" "v" "pattern"`` (``[layer head]``) and their ``"_pos"`` forms (``[layer head pos]``;
            for ``pattern_pos`` the destination position). Pattern sites need a native model.
        metric: per-example callable ``metric(logits[batch, d_out], pairs, clean_logits=None) -> Float[batch]``
            on the read-out logits, or a name from :data:`circuitkd.metrics.METRICS`: ``"logit_diff"`` (default),
            ``"prob_diff"``, ``"prob"``, ``"kl"`` (KL from the clean output). Answer-contrasting metrics need pairs whose answers
            differ, as :meth:`Task.shortcut_pairs` makes.
        direction: ``"denoise"`` (corrupt run, clean activation) or ``"noise"`` (clean run, corrupt activation).
        normalise: report ``(m - m_corrupt) / (m_clean - m_corrupt)`` instead of the raw mean metric.
        batch_size: examples per forward (memory is flat in the number of pairs).
        method: ``"auto"``, ``"fast"`` (native only), ``"stacked"`` or ``"reference"``.
        layers, heads, positions: restrict the sweep (default: all).
        copies_per_forward: patched copies per forward (stacked: ~1k rows on CPU, 8k on GPU; fast: ~32 MB of intermediates).

    Returns:
        :class:`PatchResult`; ``.values`` is ``Float[Tensor, "layer head pos"]`` (or the site's axes).
    """
    return _patch(model, pairs, site, metric, direction=direction, normalise=normalise, batch_size=batch_size,
                  method=method, layers=layers, heads=heads, positions=positions,
                  copies_per_forward=copies_per_forward)


def _patch(model, pairs, site, metric, *, direction, normalise, batch_size, method, layers, heads, positions,
           copies_per_forward, source_model=None, layer_map=None) -> PatchResult:
    check_pairs(model, pairs)
    direction = Direction.parse(direction)
    ps = get_site(site)
    check_kind(model, ps)
    metric_fn = resolve_metric(metric, pairs)
    cross = source_model is not None
    lmap = check_cross(model, source_model, layer_map) if cross else None
    if cross:
        check_pairs(source_model, pairs)
    if method not in ("auto", "fast", "stacked", "reference"):
        raise CircuitKDError(f"method must be 'auto', 'fast', 'stacked' or 'reference', got {method!r}")
    fast_ok = native.supported(model) and (not cross or native.supported(source_model))
    if method == "fast" and not fast_ok:
        raise CircuitKDError(
            f"method='fast' needs a native LN model with learned positions; this is {backbone_of(model)}: "
            "use method='stacked'"
        )
    if method == "auto":
        method = "fast" if fast_ok else "stacked"
    source = source_model if cross else model
    L, H = n_layers(model), n_heads(model)
    P = n_positions(model, pairs)
    cells, grids = make_cells(ps, L, H, P, layers, heads, positions)
    device = model_device(model)
    total = torch.zeros(len(cells), dtype=torch.float64)
    m_base_sum = m_src_sum = 0.0
    if method == "fast":
        ex = native.NativeExecutor(model)
        src_ex = native.NativeExecutor(source_model) if cross else ex
    for sub in pair_batches(pairs, batch_size, device):
        base_in, src_in = direction_inputs(sub, direction)
        if cross:
            src_in = base_in
        mask = sub.attention_mask
        r = read_positions(sub, P, device)
        B = len(sub)
        if method == "fast":
            with torch.inference_mode():
                base_cache = ex.run(base_in, mask, r)
                src_cache = src_ex.run(src_in, mask, r)
                clean_logits = src_cache.logits if (direction is Direction.DENOISE or cross) else base_cache.logits
                m_base = evaluate_metric(metric_fn, base_cache.logits, sub, clean_logits)
                m_src = evaluate_metric(metric_fn, src_cache.logits, sub, clean_logits)
                src_acts = SourceActs(src_cache, src_ex, lmap)
                n_chunk = copies_per_forward or fast_chunk(B, P, int(model.cfg.d_model), int(model.cfg.d_mlp or 0), H)
                total += run_fast(ex, base_cache, src_acts, ps, cells, sub, metric_fn, clean_logits, n_chunk)
        else:
            kind = cell_hook_kind(model, ps.kind, cross)
            cell_layers = sorted(set(cells.layer.tolist()))
            src_layers = [lmap[i] for i in cell_layers] if cross else cell_layers
            src_out, src_store = capture_batch(source, src_in, mask, source_sites(kind, src_layers))
            if kind in DELTA_READ:
                # edits made as deltas: source minus the base run's own value at the target layer
                read = DELTA_READ[kind]
                base_out, base_store = capture_batch(model, base_in, mask, source_sites(kind, cell_layers))
                src_store = {(i, kind): src_store[Site(j, read)] - base_store[Site(i, read)]
                             for i, j in zip(cell_layers, src_layers)}
                src_map = None
            else:
                with torch.inference_mode():
                    base_out = forward(model, base_in, mask)
                src_store = {(site.layer, site.kind): t for site, t in src_store.items()}
                src_map = lmap
            src_logits, base_logits = readout(src_out, r), readout(base_out, r)
            clean_logits = src_logits if (direction is Direction.DENOISE or cross) else base_logits
            m_base = evaluate_metric(metric_fn, base_logits, sub, clean_logits)
            m_src = evaluate_metric(metric_fn, src_logits, sub, clean_logits)
            if method == "stacked":
                n_chunk = copies_per_forward or max(1, stack_rows(device) // max(B, 1))
                for start in range(0, len(cells), n_chunk):
                    idx = torch.arange(start, min(start + n_chunk, len(cells)))
                    out = stacked_batch(model, base_in, mask, kind, cells, idx, src_store, src_map)
                    N = int(idx.shape[0])
                    logits = readout(out, r.repeat(N))
                    vals = evaluate_metric(metric_fn, logits, sub.repeat(N), clean_logits.repeat(N, 1))
                    total[idx] += vals.view(N, B).sum(1).cpu()
            else:
                for c in range(len(cells)):
                    layer, head, pos = int(cells.layer[c]), int(cells.head[c]), int(cells.pos[c])
                    src_layer = layer if src_map is None else src_map[layer]
                    out = reference_batch(model, base_in, mask, kind, layer, head, pos, src_store[(src_layer, kind)])
                    total[c] += evaluate_metric(metric_fn, readout(out, r), sub, clean_logits).sum().cpu()
        m_base_sum += float(m_base.sum())
        m_src_sum += float(m_src.sum())
    n = len(pairs)
    raw = (total / n).reshape(cells.shape)
    m_base_mean, m_src_mean = m_base_sum / n, m_src_sum / n
    m_clean, m_corrupt = (m_src_mean, m_base_mean) if (direction is Direction.DENOISE or cross) else (m_base_mean, m_src_mean)
    values = normalise_effect(raw, m_clean, m_corrupt) if normalise else raw
    return PatchResult(values=values.float(), raw=raw.float(), clean=m_clean, corrupt=m_corrupt, axes=ps.axes,
                       index=grids, method=method)


def patch(model, pairs: PromptPairs, site: str = "head", metric: MetricArg = None, **options) -> Tensor:
    """Node-level activation patching: the mean effect of each component, ``Float[Tensor, "layer head pos"]``
    (or the site's axes). Same arguments as :func:`patch_result`, which also returns the raw
    patched metric and the unpatched runs' metrics; this returns its ``.values``."""
    return patch_result(model, pairs, site, metric, **options).values


def cross_patch(teacher, student, pairs: PromptPairs, site: str = "head", metric: MetricArg = None, *,
                layer_map: Optional[Sequence[int]] = None, **options) -> PatchResult:
    """Cross-model patching: the teacher's activations moved into the student, one component at a time.

    Both models run the same input (the corrupt one when denoising, the clean one when noising);
    the student's layer ``i`` receives the teacher's layer ``layer_map[i]`` (default: evenly spaced
    by depth, :func:`circuitkd.models.pair.layer_map` — DistilBERT's initialisation), so the two must
    share ``d_model``, ``n_heads`` and ``d_head`` (a student initialised from its teacher). A head's
    output ``z_t @ W_O_t`` replaces ``z_s @ W_O_s``. Effects are normalised as
    ``(m - m_student) / (m_teacher - m_student)``: 1 means the component carries the whole
    teacher-student difference. Other arguments as :func:`patch_result`.
    """
    # patch_result's keyword defaults, read off its signature rather than restated here
    defaults = {name: p.default for name, p in inspect.signature(patch_result).parameters.items()
                if p.kind is p.KEYWORD_ONLY}
    options = {**defaults, **options}
    return _patch(student, pairs, site, metric, source_model=teacher, layer_map=layer_map, **options)
