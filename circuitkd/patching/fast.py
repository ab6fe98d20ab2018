"""The fast path of node patching on native models (``method="fast"``): each patched copy resumes
the one native forward (:mod:`circuitkd.native`) from the patched layer, recomputing only what
the patch can change (one position while only one has changed; the read-out position in the
last layer). The clean and corrupt runs are computed once per batch and shared by every copy."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from circuitkd.metrics import Metric, evaluate_metric
from circuitkd.native import NativeCache, NativeExecutor, after_mid, finish
from circuitkd.patching.sites import Cells, PatchSite
from circuitkd.types import PromptPairs


def take(t: Tensor, idx: Tensor, dim: int) -> Tensor:
    """Per copy ``n``, ``t.select(dim, idx[n])`` where ``t`` has no copy axis: result ``[N, ...]``."""
    return t.movedim(dim, 0)[idx]


def head_delta(ex: NativeExecutor, c: NativeCache, i: int, heads: Tensor, new_z: Tensor, old_z: Tensor) -> Tensor:
    """``(new_z - old_z) @ W_O[i, head]`` per copy; z's are ``[N,B,(P,)dh]``."""
    W = ex.layers[i]["W_O"][heads]  # [N,dh,d]
    delta = new_z - old_z
    if delta.dim() == 3:
        return torch.einsum("nbd,nde->nbe", delta, W)
    return torch.einsum("nbpd,nde->nbpe", delta, W)


def fast_group(ex: NativeExecutor, base: NativeCache, src: "SourceActs", kind: str, i: int,
                heads: Tensor, pos: Tensor, by_pos: bool) -> Tensor:
    """Read-out logits ``[N,B,d_out]`` for N cells of one kind at layer ``i``."""
    N = pos.shape[0]
    ar = torch.arange(N, device=pos.device)
    if kind == "resid_pre":
        return finish(ex, base, i, ("sparse", pos, take(src.get("resid_pre", i), pos, 1)))
    if kind == "resid_post":
        return finish(ex, base, i + 1, ("sparse", pos, take(src.get("resid_post", i), pos, 1)))
    if kind == "resid_mid":
        return finish(ex, base, i + 1, after_mid(ex, base, i, ("sparse", pos, take(src.get("resid_mid", i), pos, 1))))
    if kind == "mlp_out":
        if by_pos:
            vec = take(base.resid_mid[i], pos, 1) + take(src.get("mlp_out", i), pos, 1)
            state = ("sparse", pos, vec)
        else:
            state = ("dense", (base.resid_mid[i] + src.get("mlp_out", i)).unsqueeze(0).expand(N, -1, -1, -1))
        return finish(ex, base, i + 1, state)
    # attention-level edits: build the patched resid_mid of layer i
    if kind == "attn_out":
        if by_pos:
            mid = ("sparse", pos, take(base.resid_pre[i], pos, 1) + take(src.get("attn_out", i), pos, 1))
        else:
            mid = ("dense", (base.resid_pre[i] + src.get("attn_out", i)).unsqueeze(0).expand(N, -1, -1, -1))
        return finish(ex, base, i + 1, after_mid(ex, base, i, mid))
    if kind == "z":
        src_ho = src.head_out(i)  # [B,P,H,d]
        W_O = ex.layers[i]["W_O"][heads]  # [N,dh,d]; the base run's head outputs at the copies' cells only
        if by_pos:
            d = src_ho[:, pos, heads] - torch.einsum("bnd,nde->bne", base.z[i][:, pos, heads], W_O)  # [B,N,d]
            mid = ("sparse", pos, take(base.resid_mid[i], pos, 1) + d.transpose(0, 1))
        else:
            d = src_ho[:, :, heads] - torch.einsum("bpnd,nde->bpne", base.z[i][:, :, heads], W_O)  # [B,P,N,d]
            mid = ("dense", base.resid_mid[i].unsqueeze(0) + d.permute(2, 0, 1, 3))
        return finish(ex, base, i + 1, after_mid(ex, base, i, mid))
    # q / k / v / pattern: recompute head h's z at the affected destinations
    q_b, k_b, v_b = base.q[i], base.k[i], base.v[i]  # [B,P,H,dh]
    blocked = base.blocked  # [B|1,1,P,P]
    qh = q_b[:, :, heads].permute(2, 0, 1, 3)  # [N,B,P,dh]
    kh = k_b[:, :, heads].permute(2, 0, 1, 3)
    vh = v_b[:, :, heads].permute(2, 0, 1, 3)
    zh_old = base.z[i][:, :, heads].permute(2, 0, 1, 3)  # [N,B,P,dh]
    sparse_dest = by_pos and kind in ("q", "pattern")
    if kind in ("q", "k", "v"):
        s = src.get(kind, i)[:, :, heads].permute(2, 0, 1, 3)  # [N,B,P,dh]
        if kind == "q":
            if by_pos:
                qh = take_pos(s, pos)[:, :, None]  # [N,B,1,dh] only the patched destination
            else:
                qh = s
        else:
            new = s if not by_pos else set_pos(kh if kind == "k" else vh, pos, take_pos(s, pos))
            kh, vh = (new, vh) if kind == "k" else (kh, new)
        b_rows = blocked if not sparse_dest else take_dest(blocked, pos)
        z_new, _ = ex.attend(qh.unsqueeze(-2), kh.unsqueeze(-2), vh.unsqueeze(-2), b_rows)
        z_new = z_new[..., 0, :]  # [N,B,P|1,dh]
    else:  # pattern
        pat = src.get("pattern", i)[:, heads].transpose(0, 1)  # [N,B,P,P]
        if by_pos:
            pat = pat[ar, :, pos][:, :, None]  # [N,B,1,P]
        z_new = torch.einsum("nbqk,nbkd->nbqd", pat, vh)
    if sparse_dest:
        delta = head_delta(ex, base, i, heads, z_new[:, :, 0], take_pos(zh_old, pos))
        mid = ("sparse", pos, take(base.resid_mid[i], pos, 1) + delta)
    else:
        mid = ("dense", base.resid_mid[i].unsqueeze(0) + head_delta(ex, base, i, heads, z_new, zh_old))
    return finish(ex, base, i + 1, after_mid(ex, base, i, mid))


def take_pos(t: Tensor, pos: Tensor) -> Tensor:
    """``t[n, :, pos[n]]`` for ``t`` of shape ``[N,B,P,...]``."""
    return t[torch.arange(t.shape[0], device=t.device), :, pos]


def set_pos(t: Tensor, pos: Tensor, val: Tensor) -> Tensor:
    t = t.clone()
    t[torch.arange(t.shape[0], device=t.device), :, pos] = val
    return t


def take_dest(blocked: Tensor, pos: Tensor) -> Tensor:
    """``[N,B|1,1,1,P]``: the blocked row of each copy's destination ``pos[n]``."""
    return blocked[:, :, pos].permute(2, 0, 1, 3).unsqueeze(-2)


class SourceActs:
    """Source-run activations for the fast path, from a :class:`NativeCache` of the source model."""

    def __init__(self, cache: NativeCache, ex: NativeExecutor, layer_map: Optional[list[int]] = None):
        self.cache, self.ex, self.layer_map = cache, ex, layer_map
        self._ho: dict[int, Tensor] = {}

    def _l(self, i: int) -> int:
        return i if self.layer_map is None else self.layer_map[i]

    def get(self, name: str, i: int) -> Tensor:
        return getattr(self.cache, name)[self._l(i)]

    def head_out(self, i: int) -> Tensor:
        if i not in self._ho:
            j = self._l(i)
            self._ho[i] = torch.einsum("bphd,hde->bphe", self.cache.z[j], self.ex.layers[j]["W_O"])
        return self._ho[i]


def fast_chunk(B: int, P: int, d: int, d_mlp: int, H: int) -> int:
    per_copy = B * P * max(4 * d, d_mlp, H * P) * 4 * 3  # bytes of the widest dense intermediates
    return max(1, int(32e6 // per_copy))


def run_fast(ex: NativeExecutor, base: NativeCache, src: SourceActs, ps: PatchSite, cells: Cells,
              sub: PromptPairs, metric_fn: Metric, clean_logits: Tensor, n_chunk: int) -> Tensor:
    """Per-cell metric sums over the batch, cells grouped by layer and chunked."""
    dev = base.read_pos.device
    B = sub.clean.shape[0]
    total = torch.zeros(len(cells), dtype=torch.float64)
    for layer in sorted(set(cells.layer.tolist())):
        sel = (cells.layer == layer).nonzero()[:, 0]
        for start in range(0, len(sel), n_chunk):
            idx = sel[start:start + n_chunk]
            heads = cells.head[idx].clamp_min(0).to(dev)
            pos = cells.pos[idx].clamp_min(0).to(dev)
            logits = fast_group(ex, base, src, ps.kind, layer, heads, pos, ps.by_pos)  # [N,B,d_out]
            N = int(idx.shape[0])
            vals = evaluate_metric(metric_fn, logits.reshape(N * B, -1), sub.repeat(N), clean_logits.repeat(N, 1))
            total[idx] += vals.view(N, B).sum(1).cpu()
    return total
