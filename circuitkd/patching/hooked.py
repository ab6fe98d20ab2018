"""The hooked executors: many patched copies in the batch dimension of one bridge forward
(``method="stacked"``, any backbone) and one forward per component (``method="reference"``).
Both edit activations through :func:`set_cell`, the one table of per-kind setters."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from circuitkd.engine import forward
from circuitkd.errors import CircuitKDError
from circuitkd.hooks import Site, capture_hooks, edit_hooks, edit_point, hook_name
from circuitkd.patching.sites import Cells


def cell_hook_kind(model, kind: str, cross: bool) -> str:
    """Which site a cell edits in the hooked executors.

    Heads across models edit their outputs (z @ W_O differs between models); resid_mid on
    pre-LN bridges is edited as a delta on the attention output (see ``hooks.edit_point``).
    """
    if kind == "z" and cross:
        return "head_out"
    if kind == "resid_mid" and edit_point(model, Site(0, "resid_mid"))[1]:
        return "resid_mid_delta"
    return kind


DELTA_READ = {"head_out": "head_out", "resid_mid_delta": "resid_mid"}


def hook_site(model, kind: str, layer: int) -> str:
    if kind in DELTA_READ:
        return edit_point(model, Site(layer, DELTA_READ[kind]))[0]
    return hook_name(model, Site(layer, kind))


def _index(layout: str, head: int, pos: int) -> tuple:
    """The index of one cell in an activation of ``layout`` (batch first; -1 = every position)."""
    at = slice(None) if pos < 0 else pos
    if layout == "stream":  # [batch pos d_model]
        return (slice(None), at)
    if layout == "head":  # [batch pos head d_head] (per-head output deltas: [batch pos head d_model])
        return (slice(None), at, head)
    return (slice(None), head, at)  # pattern [batch head dest_pos src_pos]: pos is the destination


def _replace(act: Tensor, src: Tensor, layout: str, head: int, pos: int) -> None:
    idx = _index(layout, head, pos)
    act[idx] = src[idx]


def _add_head_delta(act: Tensor, src: Tensor, layout: str, head: int, pos: int) -> None:
    at = slice(None) if pos < 0 else pos
    act[:, at] += src[:, at, head]  # attn.o's output [batch pos d_model] += the head's output delta


def _add_stream_delta(act: Tensor, src: Tensor, layout: str, head: int, pos: int) -> None:
    at = slice(None) if pos < 0 else pos
    act[:, at] += src[:, at]


#: kind -> (setter, layout): how one patched cell edits the activation its hook sees.
SETTERS = {
    **{k: (_replace, "stream") for k in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")},
    **{k: (_replace, "head") for k in ("z", "q", "k", "v")},
    "pattern": (_replace, "pattern"),
    "head_out": (_add_head_delta, "head"),  # across models: z_src @ W_O_src - z @ W_O
    "resid_mid_delta": (_add_stream_delta, "stream"),  # resid_mid on pre-LN bridges, as a delta on attn out
}


def set_cell(act: Tensor, src: Tensor, kind: str, head: int, pos: int) -> None:
    """Edit one copy's activation ``act`` ``[batch, ...]`` in place from ``src`` ``[batch, ...]``
    at ``(head, pos)`` (-1 = all); ``head_out``/``resid_mid_delta`` add ``src`` as a delta."""
    if kind not in SETTERS:  # pragma: no cover
        raise CircuitKDError(f"cannot patch site kind {kind!r}")
    setter, layout = SETTERS[kind]
    setter(act, src, layout, head, pos)


def source_sites(kind: str, layers: Sequence[int]) -> list[Site]:
    k = DELTA_READ.get(kind, kind)
    return [Site(layer, k) for layer in sorted(set(layers))]


def capture_batch(model, inputs: Tensor, mask: Optional[Tensor], sites: Sequence[Site]) -> tuple[Tensor, dict]:
    store: dict = {}
    with torch.inference_mode(), edit_hooks(model, capture_hooks(model, sites, store, attention_mask=mask)):
        out = forward(model, inputs, mask)
    return out, store


def stacked_batch(model, base_in: Tensor, mask: Optional[Tensor], kind: str, cells: Cells, idx: Tensor,
                   src_acts: dict, layer_map: Optional[list[int]]) -> Tensor:
    """Raw outputs of ``len(idx)`` patched copies in one forward: ``[N*B, ...]`` (copy-major)."""
    N = int(idx.shape[0])
    B = int(base_in.shape[0])
    rep_in = base_in.repeat((N,) + (1,) * (base_in.dim() - 1))
    rep_mask = None if mask is None else mask.repeat(N, 1)
    by_hook: dict[str, list[tuple[int, int, int, Tensor]]] = {}
    for n, c in enumerate(idx.tolist()):
        layer, head, pos = int(cells.layer[c]), int(cells.head[c]), int(cells.pos[c])
        src_layer = layer if layer_map is None else layer_map[layer]
        src = src_acts[(src_layer, kind)]
        by_hook.setdefault(hook_site(model, kind, layer), []).append((n, head, pos, src))

    def make_hook(edits):
        def hook(act, *, hook):
            act = act.clone()
            view = act.view((N, B) + tuple(act.shape[1:]))
            for n, head, pos, src in edits:
                set_cell(view[n], src, kind, head, pos)
            return act
        return hook

    hooks = [(name, make_hook(edits)) for name, edits in by_hook.items()]
    with torch.inference_mode(), edit_hooks(model, hooks):
        return forward(model, rep_in, rep_mask)


def reference_batch(model, base_in: Tensor, mask: Optional[Tensor], kind: str, layer: int, head: int, pos: int,
                     src: Tensor) -> Tensor:
    """One plain hooked forward with one component patched (the slow reference)."""
    def hook(act, *, hook):
        act = act.clone()
        set_cell(act, src, kind, head, pos)
        return act

    with torch.inference_mode(), edit_hooks(model, [(hook_site(model, kind, layer), hook)]):
        return forward(model, base_in, mask)


def stack_rows(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 1024
