"""Activation patching, path patching, cross-model patching and attribution patching.

Activation patching (causal tracing, Meng et al. 2022, "Locating and Editing Factual
Associations in GPT"; practice after Heimersheim & Nanda 2024, "How to use and interpret
activation patching") runs a model on a *clean* and a *corrupt* input and, for one
component at a time, swaps that component's activation between the runs:

- ``direction="denoise"``: the corrupt run with one clean activation (is it *sufficient*?);
- ``direction="noise"``: the clean run with one corrupt activation (is it *necessary*?).

The metric (default: the logit difference between ``pairs.clean_answer`` and
``pairs.corrupt_answer`` read at ``pairs.position``) is averaged over pairs and, with
``normalise=True``, reported as ``(m - m_corrupt) / (m_clean - m_corrupt)``: 1 means the
patched run behaves like the clean run, 0 like the corrupt one, in both directions.

Path patching (Wang et al. 2022, "Interpretability in the Wild", IOI) measures one sender
head's effect through chosen receivers only: every other component is frozen to the base
run while the sender is patched, the receivers' q/k/v (or the classifier read-out) are
recomputed and recorded, then patched alone into a fresh base run.

Cross-model patching (``source_model=``) moves activations from one model (a teacher)
into another of matching shape (a student initialised from it) at matched layers, on
the same inputs, to localise what distillation changed.

Attribution patching (Nanda 2023, "Attribution Patching: Activation Patching At
Industrial Scale") is the first-order screen: one forward and one backward give
``grad · (source − base)`` for every site at once.

How it is fast. Three executors compute the same numbers:

- ``method="reference"``: one hooked bridge forward per component — slow and obvious,
  for tests.
- ``method="stacked"``: many patched copies ride in the batch dimension of one hooked
  bridge forward (copy index × example), in chunks of ``copies_per_forward`` — any
  backbone, the way to use a GPU.
- ``method="fast"`` (native encoders and causal native models): a per-layer forward on
  the bridge's own weights (checked equal to the bridge to 1e-5 in the tests) that does
  not recompute what cannot change. It starts from the cached base activations at the
  patched layer; while a patch has changed one position only, it recomputes that
  position alone (MLPs are position-wise; q/k/v of the other positions are cached);
  from the next attention on it recomputes every position; and in the last layer it
  computes only the read-out position. The clean and corrupt runs are done once per
  batch and reused by every patched copy.

``method="auto"`` picks ``fast`` where it applies, else ``stacked``.

Per-head outputs exclude ``b_O`` (see :mod:`circuitkd.hooks`); patching a head's output
is patching its ``z`` (the output is linear in ``z``), except across models, where the
source head's output ``z_src @ W_O_src`` replaces the target head's ``z @ W_O``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from circuitkd import native
from circuitkd.engine import forward, iter_batches, model_device
from circuitkd.errors import CircuitKDError
from circuitkd.hooks import (
    Site, backbone_of, capture_hooks, edit_hooks, edit_point, has_mlp, hook_name, n_heads, n_layers,
)
from circuitkd.metrics import Metric, MetricArg, evaluate_metric, resolve_metric
from circuitkd.types import PromptPairs

# ---------------------------------------------------------------------------- site table


@dataclass(frozen=True)
class PatchSite:
    """A patchable site family: the activation ``kind`` and the axes its result has."""

    name: str
    kind: str
    axes: tuple[str, ...]

    @property
    def by_pos(self) -> bool:
        return "pos" in self.axes

    @property
    def by_head(self) -> bool:
        return "head" in self.axes


_SITE_LIST = [
    PatchSite("resid", "resid_pre", ("layer", "pos")),
    PatchSite("resid_pre", "resid_pre", ("layer", "pos")),
    PatchSite("resid_mid", "resid_mid", ("layer", "pos")),
    PatchSite("resid_post", "resid_post", ("layer", "pos")),
    PatchSite("attn_out", "attn_out", ("layer", "pos")),
    PatchSite("attn_out_layer", "attn_out", ("layer",)),
    PatchSite("mlp_out", "mlp_out", ("layer", "pos")),
    PatchSite("mlp_out_layer", "mlp_out", ("layer",)),
    PatchSite("head", "z", ("layer", "head")),
    PatchSite("head_pos", "z", ("layer", "head", "pos")),
] + [
    PatchSite(f"{k}{suffix}", k, ("layer", "head") + (("pos",) if suffix else ()))
    for k in ("q", "k", "v", "pattern") for suffix in ("", "_pos")
]
#: site name -> PatchSite. ``pattern_pos``'s position is the destination (query) position.
SITES: dict[str, PatchSite] = {s.name: s for s in _SITE_LIST}


def _site(name: str) -> PatchSite:
    if name not in SITES:
        raise CircuitKDError(f"unknown patching site {name!r}; expected one of {sorted(SITES)}")
    return SITES[name]


def _repeat_pairs(pairs: PromptPairs, n: int) -> PromptPairs:
    if n == 1:
        return pairs
    rep = lambda t: None if t is None else t.repeat((n,) + (1,) * (t.dim() - 1))  # noqa: E731
    return PromptPairs(clean=rep(pairs.clean), corrupt=rep(pairs.corrupt), clean_answer=rep(pairs.clean_answer),
                       corrupt_answer=rep(pairs.corrupt_answer), attention_mask=rep(pairs.attention_mask),
                       position=pairs.position, meta=None)


# ---------------------------------------------------------------------------- read-out


def read_positions(model, pairs: PromptPairs, n_pos: int) -> Tensor:
    """``Int[batch]``: where each pair's output is read (``pairs.position``; -1 = last real token)."""
    b = len(pairs)
    dev = model_device(model)
    if pairs.position == -1 and pairs.attention_mask is not None:
        return (pairs.attention_mask.long().sum(1) - 1).to(dev)
    pos = pairs.position if pairs.position >= 0 else n_pos + pairs.position
    if not 0 <= pos < n_pos:
        raise CircuitKDError(f"read position {pairs.position} is outside the {n_pos} positions")
    return torch.full((b,), pos, dtype=torch.long, device=dev)


def readout(out: Tensor, read_pos: Tensor) -> Float[Tensor, "batch d_out"]:
    """Reduce a raw bridge output to ``[batch, d_out]``: per-position outputs read at ``read_pos``."""
    if out.dim() == 2:
        return out
    return out[torch.arange(out.shape[0], device=out.device), read_pos]


# ---------------------------------------------------------------------------- cells


@dataclass
class _Cells:
    """The components to patch: one row ``(layer, head, pos)`` each (-1 = not indexed)."""

    layer: Tensor
    head: Tensor
    pos: Tensor
    shape: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.layer.shape[0])


def _make_cells(site: PatchSite, L: int, H: int, P: int, layers: Optional[Sequence[int]],
                heads: Optional[Sequence[int]], positions: Optional[Sequence[int]]) -> tuple[_Cells, list]:
    layers = list(range(L)) if layers is None else list(layers)
    for layer in layers:
        if not 0 <= layer < L:
            raise CircuitKDError(f"layer {layer} out of range; the model has {L} layers")
    heads = list(range(H)) if heads is None else list(heads)
    for h in heads:
        if not 0 <= h < H:
            raise CircuitKDError(f"head index {h} out of range; the model has {H} heads per layer")
    positions = list(range(P)) if positions is None else list(positions)
    for p in positions:
        if not 0 <= p < P:
            raise CircuitKDError(f"position {p} out of range; inputs have {P} positions")
    grids = [layers]
    if site.by_head:
        grids.append(heads)
    if site.by_pos:
        grids.append(positions)
    mesh = torch.cartesian_prod(*[torch.tensor(g, dtype=torch.long) for g in grids]).reshape(-1, len(grids))
    cols = {"layer": mesh[:, 0]}
    i = 1
    for axis in ("head", "pos"):
        if axis in site.axes:
            cols[axis] = mesh[:, i]
            i += 1
        else:
            cols[axis] = torch.full((mesh.shape[0],), -1, dtype=torch.long)
    shape = tuple(len(g) for g in grids)
    return _Cells(cols["layer"], cols["head"], cols["pos"], shape), grids


# ---------------------------------------------------------------------------- checks


def _check_pairs(model, pairs: PromptPairs) -> None:
    if not isinstance(pairs, PromptPairs):
        raise CircuitKDError(f"pairs must be a PromptPairs, got {type(pairs).__name__}")
    if pairs.clean.shape != pairs.corrupt.shape:  # PromptPairs checks this too; fields may be reassigned
        raise CircuitKDError(
            f"clean and corrupt differ in shape: clean {tuple(pairs.clean.shape)}, corrupt {tuple(pairs.corrupt.shape)}"
        )
    if len(pairs) == 0:
        raise CircuitKDError("pairs is empty")
    backbone = backbone_of(model)
    if backbone == "vit" and not pairs.clean.is_floating_point():
        raise CircuitKDError(f"ViT needs pixel inputs [batch channel height width], got {tuple(pairs.clean.shape)} of {pairs.clean.dtype}")
    if backbone != "vit":
        if pairs.clean.dim() != 2 or pairs.clean.is_floating_point():
            raise CircuitKDError(f"text models need Int[batch pos] token ids, got {tuple(pairs.clean.shape)} of {pairs.clean.dtype}")
        n_ctx = int(model.cfg.n_ctx)
        if pairs.clean.shape[1] > n_ctx:
            raise CircuitKDError(f"inputs have {pairs.clean.shape[1]} tokens but the model's n_ctx is {n_ctx}")
        d_vocab = getattr(model.cfg, "d_vocab", None)
        top = int(torch.maximum(pairs.clean.max(), pairs.corrupt.max()))
        if d_vocab and d_vocab > 0 and top >= d_vocab:
            raise CircuitKDError(f"pairs hold token id {top} but the model's vocabulary has {d_vocab} ids")


def _check_kind(model, site: PatchSite) -> None:
    if site.kind == "mlp_out" and not has_mlp(model):
        raise CircuitKDError(f"site {site.name!r}: this attention-only model has no MLP")
    if site.kind == "pattern":
        hook_name(model, Site(0, "pattern"))  # raises for HF attention


def _n_positions(model, pairs: PromptPairs) -> int:
    if backbone_of(model) == "vit":
        cfg = getattr(model, "circuitkd_spec", None)
        if cfg is not None:
            return (cfg.image_size // cfg.patch_size) ** 2 + 1
        with torch.inference_mode():
            store: dict = {}
            with edit_hooks(model, capture_hooks(model, [Site(0, "resid_pre")], store)):
                forward(model, pairs.clean[:1].to(model_device(model)))
            return int(store[Site(0, "resid_pre")].shape[1])
    return int(pairs.clean.shape[1])


def _default_layer_map(target, source) -> list[int]:
    lt, ls = n_layers(target), n_layers(source)
    return [i * ls // lt for i in range(lt)]


def _check_cross(target, source, layer_map: Optional[Sequence[int]]) -> list[int]:
    if backbone_of(target) != backbone_of(source):
        raise CircuitKDError(
            f"cross-model patching needs one backbone: target is {backbone_of(target)}, source {backbone_of(source)}"
        )
    for attr in ("d_model", "n_heads", "d_head"):
        a, b = int(getattr(target.cfg, attr)), int(getattr(source.cfg, attr))
        if a != b:
            raise CircuitKDError(f"cross-model patching needs matching shapes: target {attr}={a}, source {attr}={b}")
    lmap = _default_layer_map(target, source) if layer_map is None else list(layer_map)
    if len(lmap) != n_layers(target):
        raise CircuitKDError(f"layer_map has {len(lmap)} entries; the target model has {n_layers(target)} layers")
    for i, j in enumerate(lmap):
        if not 0 <= j < n_layers(source):
            raise CircuitKDError(f"layer_map[{i}]={j} out of range; the source model has {n_layers(source)} layers")
    return lmap


# ---------------------------------------------------------------------------- native fast executor


def fast_path_supported(model) -> bool:
    """Whether the native per-layer executor reproduces this model (LN, learned positions, plain MLP)."""
    return backbone_of(model) == "native" and native.supported(model)


class NativeExecutor:
    """A TL-native encoder's forward, layer by layer, on the bridge's own weights.

    Used by the fast patching path; :meth:`run` equals the bridge's output to 1e-5.
    """

    def __init__(self, model):
        if not fast_path_supported(model):
            raise CircuitKDError("the fast patching path supports native LN models with learned positions only")
        cfg = model.cfg
        self.model = model
        self.L, self.H, self.dh, self.d = int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_head), int(cfg.d_model)
        self.causal = cfg.attention_dir == "causal"
        self.attn_only = bool(cfg.attn_only)
        self.act = native.ACTIVATIONS[(cfg.act_fn or "gelu").lower()]
        orig = lambda m: m.original_component  # noqa: E731
        self.tok = orig(model.embed).weight
        self.pos = orig(model.pos_embed).weight
        self.layers = []
        for blk in model.blocks:
            ln1 = orig(blk.ln1)
            layer = dict(
                ln1=(ln1.weight, ln1.bias, ln1.eps),
                q=orig(blk.attn.q), k=orig(blk.attn.k), v=orig(blk.attn.v), o=orig(blk.attn.o),
                W_O=orig(blk.attn.o).weight.T.reshape(self.H, self.dh, self.d),
            )
            if not self.attn_only:
                ln2 = orig(blk.ln2)
                layer.update(ln2=(ln2.weight, ln2.bias, ln2.eps), fc_in=orig(getattr(blk.mlp, "in")),
                             fc_out=orig(blk.mlp.out))
            self.layers.append(layer)
        lnf = orig(model.ln_final)
        self.lnf = (lnf.weight, lnf.bias, lnf.eps)
        self.unembed = orig(model.unembed)
        self.scale = native.attn_scale(model)

    # -- pieces
    def ln(self, x: Tensor, p) -> Tensor:
        w, b, eps = p
        return F.layer_norm(x, (self.d,), w, b, eps)

    def heads(self, lin, x: Tensor) -> Tensor:
        """``[..., d] -> [..., head, d_head]``."""
        return F.linear(x, lin.weight, lin.bias).unflatten(-1, (self.H, self.dh))

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """Resid mid -> resid post (position-wise)."""
        if self.attn_only:
            return x
        p = self.layers[layer]
        h = self.act(F.linear(self.ln(x, p["ln2"]), p["fc_in"].weight, p["fc_in"].bias))
        return x + F.linear(h, p["fc_out"].weight, p["fc_out"].bias)

    def blocked(self, mask: Optional[Tensor], P: int, device) -> Tensor:
        """``Bool[batch|1, 1, dest, src]``: True where attention is not allowed (:func:`circuitkd.native.blocked_mask`)."""
        return native.blocked_mask(mask, P, self.causal, device)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, blocked: Tensor) -> tuple[Tensor, Tensor]:
        """q ``[..., dest, head, dh]``, k/v ``[..., src, head, dh]`` -> (z ``[..., dest, head, dh]``, pattern ``[..., head, dest, src]``)."""
        return native.attend(q, k, v, blocked, self.scale)

    def out(self, layer: int, z: Tensor) -> Tensor:
        o = self.layers[layer]["o"]
        return F.linear(z.flatten(-2), o.weight, o.bias)

    def logits(self, x: Tensor) -> Tensor:
        return F.linear(self.ln(x, self.lnf), self.unembed.weight, self.unembed.bias)

    # -- full forward with cache
    def run(self, tokens: Tensor, mask: Optional[Tensor], read_pos: Tensor) -> "_NativeCache":
        B, P = tokens.shape
        x = self.tok[tokens] + self.pos[:P][None]
        blocked = self.blocked(mask, P, tokens.device)
        c = _NativeCache(blocked=blocked, read_pos=read_pos)
        for i, p in enumerate(self.layers):
            c.resid_pre.append(x)
            h = self.ln(x, p["ln1"])
            q, k, v = self.heads(p["q"], h), self.heads(p["k"], h), self.heads(p["v"], h)
            z, pattern = self.attend(q, k, v, blocked)
            attn = self.out(i, z)
            mid = x + attn
            post = self.mlp(i, mid)
            c.q.append(q), c.k.append(k), c.v.append(v), c.z.append(z), c.pattern.append(pattern)
            c.attn_out.append(attn), c.resid_mid.append(mid), c.mlp_out.append(post - mid), c.resid_post.append(post)
            x = post
        c.logits = self.logits(x[torch.arange(B, device=x.device), read_pos])
        return c


@dataclass
class _NativeCache:
    blocked: Tensor
    read_pos: Tensor
    logits: Optional[Tensor] = None

    def __post_init__(self) -> None:
        for name in ("resid_pre", "q", "k", "v", "z", "pattern", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, name, [])

    def at_read(self, name: str, layer: int) -> Tensor:
        """``[batch, ...]``: the cached activation at each example's read position."""
        t = getattr(self, name)[layer]
        return t[torch.arange(t.shape[0], device=t.device), self.read_pos]


# Patched states of the residual stream for N copies of a B-example batch:
#   ("sparse", pos[N], vec[N,B,d]) - equals the base run except at one position per copy;
#   ("dense", x[N,B,P,d]);  ("read", x[N,B,d]) - only each example's read-out position.


def _scatter_pos(base: Tensor, pos: Tensor, vec: Tensor) -> Tensor:
    """Base ``[B,P,...]`` expanded to ``[N,B,P,...]`` with copy n's position ``pos[n]`` set to ``vec[n]``."""
    N = pos.shape[0]
    x = base.unsqueeze(0).expand((N,) + tuple(base.shape)).clone()
    x[torch.arange(N, device=pos.device), :, pos] = vec
    return x


def _read_of_sparse(ex: NativeExecutor, c: _NativeCache, base_name: str, layer: int, pos: Tensor, vec: Tensor) -> Tensor:
    """``[N,B,d]`` at each example's read position: the patched vector where ``pos == read_pos``."""
    base_r = c.at_read(base_name, layer).unsqueeze(0).expand_as(vec)
    hit = (pos[:, None] == c.read_pos[None, :])[..., None]
    return torch.where(hit, vec, base_r)


def _layer(ex: NativeExecutor, c: _NativeCache, i: int, state: tuple) -> tuple:
    """Run layer ``i`` on a patched resid_pre state; returns the resid_pre state of layer ``i+1`` (or "read")."""
    last = i == ex.L - 1
    p = ex.layers[i]
    B = c.read_pos.shape[0]
    ar = torch.arange(B, device=c.read_pos.device)
    kind = state[0]
    if kind == "read":
        raise CircuitKDError("internal: a read-out state cannot enter another layer")  # pragma: no cover
    if kind == "sparse":
        _, pos, vec = state
        h = ex.ln(vec, p["ln1"])
        qp, kp, vp = ex.heads(p["q"], h), ex.heads(p["k"], h), ex.heads(p["v"], h)  # [N,B,H,dh]
        K, V = _scatter_pos(c.k[i], pos, kp), _scatter_pos(c.v[i], pos, vp)  # [N,B,P,H,dh]
        if last:
            hit = (pos[:, None] == c.read_pos[None, :])[..., None, None]
            q_r = torch.where(hit, qp, c.q[i][ar, c.read_pos].unsqueeze(0))  # [N,B,H,dh]
            blocked_r = c.blocked.expand(B, -1, -1, -1)[ar, :, c.read_pos].unsqueeze(-2)  # [B,1,1,P]
            z_r, _ = ex.attend(q_r.unsqueeze(-3), K, V, blocked_r)
            pre_r = _read_of_sparse(ex, c, "resid_pre", i, pos, vec)
            return ("read", ex.mlp(i, pre_r + ex.out(i, z_r[..., 0, :, :])))
        Q = _scatter_pos(c.q[i], pos, qp)
        z, _ = ex.attend(Q, K, V, c.blocked)
        x = _scatter_pos(c.resid_pre[i], pos, vec)
        return ("dense", ex.mlp(i, x + ex.out(i, z)))
    x = state[1]  # dense [N,B,P,d]
    h = ex.ln(x, p["ln1"])
    k, v = ex.heads(p["k"], h), ex.heads(p["v"], h)
    if last:
        x_r = x[:, ar, c.read_pos]  # [N,B,d]
        q_r = ex.heads(p["q"], h[:, ar, c.read_pos])
        blocked_r = c.blocked.expand(B, -1, -1, -1)[ar, :, c.read_pos].unsqueeze(-2)
        z_r, _ = ex.attend(q_r.unsqueeze(-3), k, v, blocked_r)
        return ("read", ex.mlp(i, x_r + ex.out(i, z_r[..., 0, :, :])))
    z, _ = ex.attend(ex.heads(p["q"], h), k, v, c.blocked)
    return ("dense", ex.mlp(i, x + ex.out(i, z)))


def _after_mid(ex: NativeExecutor, c: _NativeCache, i: int, state: tuple) -> tuple:
    """A patched resid_mid state of layer ``i`` -> the resid_pre state of layer ``i+1`` (or "read")."""
    last = i == ex.L - 1
    if state[0] == "sparse":
        _, pos, vec = state
        post = ex.mlp(i, vec)
        if last:
            return ("read", _read_of_sparse(ex, c, "resid_post", i, pos, post))
        return ("sparse", pos, post)
    x = state[1]
    if last:
        ar = torch.arange(x.shape[1], device=x.device)
        return ("read", ex.mlp(i, x[:, ar, c.read_pos]))
    return ("dense", ex.mlp(i, x))


def _finish(ex: NativeExecutor, c: _NativeCache, start: int, state: tuple) -> Tensor:
    """Propagate a resid_pre state from layer ``start`` to the read-out logits ``[N,B,d_out]``."""
    i = start
    while state[0] != "read":
        if i == ex.L:  # a sparse/dense state past the last block: read it
            if state[0] == "sparse":
                state = ("read", _read_of_sparse(ex, c, "resid_post", ex.L - 1, state[1], state[2]))
            else:
                ar = torch.arange(state[1].shape[1], device=state[1].device)
                state = ("read", state[1][:, ar, c.read_pos])
            break
        state = _layer(ex, c, i, state)
        i += 1
    return ex.logits(state[1])


def _take(t: Tensor, idx: Tensor, dim: int) -> Tensor:
    """Per copy ``n``, ``t.select(dim, idx[n])`` where ``t`` has no copy axis: result ``[N, ...]``."""
    return t.movedim(dim, 0)[idx]


def _head_delta(ex: NativeExecutor, c: _NativeCache, i: int, heads: Tensor, new_z: Tensor, old_z: Tensor) -> Tensor:
    """``(new_z - old_z) @ W_O[i, head]`` per copy; z's are ``[N,B,(P,)dh]``."""
    W = ex.layers[i]["W_O"][heads]  # [N,dh,d]
    delta = new_z - old_z
    if delta.dim() == 3:
        return torch.einsum("nbd,nde->nbe", delta, W)
    return torch.einsum("nbpd,nde->nbpe", delta, W)


def _fast_group(ex: NativeExecutor, base: _NativeCache, src: "_SourceActs", kind: str, i: int,
                heads: Tensor, pos: Tensor, by_pos: bool) -> Tensor:
    """Read-out logits ``[N,B,d_out]`` for N cells of one kind at layer ``i``."""
    N = pos.shape[0]
    ar = torch.arange(N, device=pos.device)
    if kind == "resid_pre":
        return _finish(ex, base, i, ("sparse", pos, _take(src.get("resid_pre", i), pos, 1)))
    if kind == "resid_post":
        return _finish(ex, base, i + 1, ("sparse", pos, _take(src.get("resid_post", i), pos, 1)))
    if kind == "resid_mid":
        return _finish(ex, base, i + 1, _after_mid(ex, base, i, ("sparse", pos, _take(src.get("resid_mid", i), pos, 1))))
    if kind == "mlp_out":
        if by_pos:
            vec = _take(base.resid_mid[i], pos, 1) + _take(src.get("mlp_out", i), pos, 1)
            state = ("sparse", pos, vec)
        else:
            state = ("dense", (base.resid_mid[i] + src.get("mlp_out", i)).unsqueeze(0).expand(N, -1, -1, -1))
        return _finish(ex, base, i + 1, state)
    # attention-level edits: build the patched resid_mid of layer i
    if kind == "attn_out":
        if by_pos:
            mid = ("sparse", pos, _take(base.resid_pre[i], pos, 1) + _take(src.get("attn_out", i), pos, 1))
        else:
            mid = ("dense", (base.resid_pre[i] + src.get("attn_out", i)).unsqueeze(0).expand(N, -1, -1, -1))
        return _finish(ex, base, i + 1, _after_mid(ex, base, i, mid))
    if kind == "z":
        src_ho = src.head_out(i)  # [B,P,H,d]
        base_ho = torch.einsum("bphd,hde->bphe", base.z[i], ex.layers[i]["W_O"])
        if by_pos:
            d = src_ho[:, pos, heads] - base_ho[:, pos, heads]  # [B,N,d]
            mid = ("sparse", pos, _take(base.resid_mid[i], pos, 1) + d.transpose(0, 1))
        else:
            d = (src_ho[:, :, heads] - base_ho[:, :, heads]).permute(2, 0, 1, 3)  # [N,B,P,d]
            mid = ("dense", base.resid_mid[i].unsqueeze(0) + d)
        return _finish(ex, base, i + 1, _after_mid(ex, base, i, mid))
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
                qh = _take_pos(s, pos)[:, :, None]  # [N,B,1,dh] only the patched destination
            else:
                qh = s
        else:
            new = s if not by_pos else _set_pos(kh if kind == "k" else vh, pos, _take_pos(s, pos))
            kh, vh = (new, vh) if kind == "k" else (kh, new)
        b_rows = blocked if not sparse_dest else _take_dest(blocked, pos)
        z_new, _ = ex.attend(qh.unsqueeze(-2), kh.unsqueeze(-2), vh.unsqueeze(-2), b_rows)
        z_new = z_new[..., 0, :]  # [N,B,P|1,dh]
    else:  # pattern
        pat = src.get("pattern", i)[:, heads].transpose(0, 1)  # [N,B,P,P]
        if by_pos:
            pat = pat[ar, :, pos][:, :, None]  # [N,B,1,P]
        z_new = torch.einsum("nbqk,nbkd->nbqd", pat, vh)
    if sparse_dest:
        delta = _head_delta(ex, base, i, heads, z_new[:, :, 0], _take_pos(zh_old, pos))
        mid = ("sparse", pos, _take(base.resid_mid[i], pos, 1) + delta)
    else:
        mid = ("dense", base.resid_mid[i].unsqueeze(0) + _head_delta(ex, base, i, heads, z_new, zh_old))
    return _finish(ex, base, i + 1, _after_mid(ex, base, i, mid))


def _take_pos(t: Tensor, pos: Tensor) -> Tensor:
    """``t[n, :, pos[n]]`` for ``t`` of shape ``[N,B,P,...]``."""
    return t[torch.arange(t.shape[0], device=t.device), :, pos]


def _set_pos(t: Tensor, pos: Tensor, val: Tensor) -> Tensor:
    t = t.clone()
    t[torch.arange(t.shape[0], device=t.device), :, pos] = val
    return t


def _take_dest(blocked: Tensor, pos: Tensor) -> Tensor:
    """``[N,B|1,1,1,P]``: the blocked row of each copy's destination ``pos[n]``."""
    return blocked[:, :, pos].permute(2, 0, 1, 3).unsqueeze(-2)


class _SourceActs:
    """Source-run activations for the fast path, from a :class:`_NativeCache` of the source model."""

    def __init__(self, cache: _NativeCache, ex: NativeExecutor, layer_map: Optional[list[int]] = None):
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


# ---------------------------------------------------------------------------- generic (hooked) executors


def _cell_hook_kind(model, kind: str, cross: bool) -> str:
    """Which site a cell edits in the hooked executors.

    Heads across models edit their outputs (z @ W_O differs between models); resid_mid on
    pre-LN bridges is edited as a delta on the attention output (see ``hooks.edit_point``).
    """
    if kind == "z" and cross:
        return "head_out"
    if kind == "resid_mid" and edit_point(model, Site(0, "resid_mid"))[1]:
        return "resid_mid_delta"
    return kind


_DELTA_READ = {"head_out": "head_out", "resid_mid_delta": "resid_mid"}


def _hook_site(model, kind: str, layer: int) -> str:
    if kind in _DELTA_READ:
        return edit_point(model, Site(layer, _DELTA_READ[kind]))[0]
    return hook_name(model, Site(layer, kind))


def _set_cell(act: Tensor, src: Tensor, kind: str, head: int, pos: int) -> None:
    """Edit one copy's activation ``act`` ``[B, ...]`` in place from ``src`` ``[B, ...]``.

    For ``head_out`` ``src`` is the per-head output delta ``[B,P,H,d]`` added to attn.o's output.
    """
    if kind in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
        if pos >= 0:
            act[:, pos] = src[:, pos]
        else:
            act[:] = src
    elif kind in ("z", "q", "k", "v"):
        if pos >= 0:
            act[:, pos, head] = src[:, pos, head]
        else:
            act[:, :, head] = src[:, :, head]
    elif kind == "pattern":
        if pos >= 0:
            act[:, head, pos] = src[:, head, pos]
        else:
            act[:, head] = src[:, head]
    elif kind == "head_out":
        if pos >= 0:
            act[:, pos] += src[:, pos, head]
        else:
            act += src[:, :, head]
    elif kind == "resid_mid_delta":
        if pos >= 0:
            act[:, pos] += src[:, pos]
        else:
            act += src
    else:  # pragma: no cover
        raise CircuitKDError(f"cannot patch site kind {kind!r}")


def _source_sites(kind: str, layers: Sequence[int]) -> list[Site]:
    k = _DELTA_READ.get(kind, kind)
    return [Site(layer, k) for layer in sorted(set(layers))]


def _capture_batch(model, inputs: Tensor, mask: Optional[Tensor], sites: Sequence[Site]) -> tuple[Tensor, dict]:
    store: dict = {}
    with torch.inference_mode(), edit_hooks(model, capture_hooks(model, sites, store, attention_mask=mask)):
        out = forward(model, inputs, mask)
    return out, store


def _stacked_batch(model, base_in: Tensor, mask: Optional[Tensor], kind: str, cells: _Cells, idx: Tensor,
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
        by_hook.setdefault(_hook_site(model, kind, layer), []).append((n, head, pos, src))

    def make_hook(edits):
        def hook(act, *, hook):
            act = act.clone()
            view = act.view((N, B) + tuple(act.shape[1:]))
            for n, head, pos, src in edits:
                _set_cell(view[n], src, kind, head, pos)
            return act
        return hook

    hooks = [(name, make_hook(edits)) for name, edits in by_hook.items()]
    with torch.inference_mode(), edit_hooks(model, hooks):
        return forward(model, rep_in, rep_mask)


def _reference_batch(model, base_in: Tensor, mask: Optional[Tensor], kind: str, layer: int, head: int, pos: int,
                     src: Tensor) -> Tensor:
    """One plain hooked forward with one component patched (the slow reference)."""
    def hook(act, *, hook):
        act = act.clone()
        if kind in ("head_out", "resid_mid_delta"):
            sel = src if kind == "resid_mid_delta" else src[:, :, head]
            if pos < 0:
                act = act + sel
            else:
                act[:, pos] = act[:, pos] + sel[:, pos]
        elif kind == "pattern":
            if pos < 0:
                act[:, head] = src[:, head]
            else:
                act[:, head, pos] = src[:, head, pos]
        elif kind in ("z", "q", "k", "v"):
            if pos < 0:
                act[:, :, head] = src[:, :, head]
            else:
                act[:, pos, head] = src[:, pos, head]
        elif pos < 0:
            act = src.clone()
        else:
            act[:, pos] = src[:, pos]
        return act

    with torch.inference_mode(), edit_hooks(model, [(_hook_site(model, kind, layer), hook)]):
        return forward(model, base_in, mask)


# ---------------------------------------------------------------------------- public API


def _direction_inputs(pairs: PromptPairs, direction: str) -> tuple[Tensor, Tensor]:
    if direction == "denoise":
        return pairs.corrupt, pairs.clean
    if direction == "noise":
        return pairs.clean, pairs.corrupt
    raise CircuitKDError(f"direction must be 'denoise' or 'noise', got {direction!r}")


def _normalise(values: Tensor, m_clean: float, m_corrupt: float) -> Tensor:
    denom = m_clean - m_corrupt
    if abs(denom) < 1e-8:
        raise CircuitKDError(
            f"cannot normalise: the metric is the same on clean ({m_clean:.6g}) and corrupt ({m_corrupt:.6g}) "
            "runs; pass normalise=False"
        )
    return (values - m_corrupt) / denom


@dataclass
class PatchResult:
    """Everything :func:`patch` measured (``patch(..., return_result=True)``).

    ``values``: the (normalised) effects over ``axes``; ``raw``: mean patched metric;
    ``clean``/``corrupt``: mean metric of the unpatched runs (for cross-model patching:
    the source and target models' runs); ``index``: the layer/head/pos values of each axis.
    """

    values: Tensor
    raw: Tensor
    clean: float
    corrupt: float
    axes: tuple[str, ...]
    index: list
    method: str


def patch(
    model,
    pairs: PromptPairs,
    site: str = "head",
    metric: MetricArg = None,
    *,
    direction: str = "denoise",
    normalise: bool = True,
    batch_size: int = 64,
    method: str = "auto",
    layers: Optional[Sequence[int]] = None,
    heads: Optional[Sequence[int]] = None,
    positions: Optional[Sequence[int]] = None,
    source_model=None,
    layer_map: Optional[Sequence[int]] = None,
    copies_per_forward: Optional[int] = None,
    return_result: bool = False,
) -> Tensor | PatchResult:
    """Node-level activation patching: the effect of each component, over ``(layer[, head][, pos])``.

    Args:
        model: any supported bridge (native encoder or causal model, BERT, ViT).
        pairs: clean/corrupt inputs of one shape with answers and the read-out position.
        site: one of :data:`SITES` — ``"head"`` (each head's output, all positions: ``[layer head]``),
            ``"head_pos"`` (``[layer head pos]``), ``"resid"``/``"resid_pre"``/``"resid_mid"``/``"resid_post"``
            (``[layer pos]``), ``"attn_out"``/``"mlp_out"`` (``[layer pos]``), ``"attn_out_layer"``/``"mlp_out_layer"``
            (``[layer]``), ``"q" "k" "v" "pattern"`` (``[layer head]``) and their ``"_pos"`` forms (``[layer head pos]``;
            for ``pattern_pos`` the destination position). Pattern sites need a native model.
        metric: per-example callable ``metric(logits[batch, d_out], pairs) -> Float[batch]`` on the read-out
            logits (an object with ``uses_clean_logits = True`` also gets ``clean_logits=``), or a name
            from :data:`circuitkd.metrics.METRICS`: ``"logit_diff"`` (default), ``"prob_diff"``, ``"prob"``,
            ``"kl"`` (KL from the clean output). Answer-contrasting metrics need pairs whose answers
            differ, as :meth:`Task.shortcut_pairs` makes.
        direction: ``"denoise"`` (corrupt run, clean activation) or ``"noise"`` (clean run, corrupt activation).
        normalise: report ``(m - m_corrupt) / (m_clean - m_corrupt)`` instead of the raw mean metric.
        batch_size: examples per forward (memory is flat in the number of pairs).
        method: ``"auto"``, ``"fast"`` (native only), ``"stacked"`` or ``"reference"``.
        layers, heads, positions: restrict the sweep (default: all).
        source_model: patch this model's activations (on the same input as the base run: the corrupt
            input when denoising) into ``model`` at ``layer_map`` layers (default ``i -> i*L_src//L``, the
            DistilBERT every-other-layer initialisation). Normalised as ``(m - m_model) / (m_source - m_model)``.
        copies_per_forward: patched copies per forward (stacked: ~1k rows on CPU, 8k on GPU; fast: ~32 MB of intermediates).
        return_result: return a :class:`PatchResult` instead of the tensor.

    Returns:
        ``Float[Tensor, "layer head pos"]`` (or the site's axes): mean effect per component.
    """
    _check_pairs(model, pairs)
    ps = _site(site)
    _check_kind(model, ps)
    metric_fn = resolve_metric(metric, pairs)
    cross = source_model is not None
    lmap = _check_cross(model, source_model, layer_map) if cross else None
    if cross:
        _check_pairs(source_model, pairs)
    if method not in ("auto", "fast", "stacked", "reference"):
        raise CircuitKDError(f"method must be 'auto', 'fast', 'stacked' or 'reference', got {method!r}")
    fast_ok = fast_path_supported(model) and (not cross or fast_path_supported(source_model))
    if method == "fast" and not fast_ok:
        raise CircuitKDError(
            f"method='fast' needs a native LN model with learned positions; this is {backbone_of(model)}: "
            "use method='stacked'"
        )
    if method == "auto":
        method = "fast" if fast_ok else "stacked"
    source = source_model if cross else model
    L, H = n_layers(model), n_heads(model)
    P = _n_positions(model, pairs)
    cells, grids = _make_cells(ps, L, H, P, layers, heads, positions)
    device = model_device(model)
    total = torch.zeros(len(cells), dtype=torch.float64)
    m_base_sum = m_src_sum = 0.0
    if method == "fast":
        ex = NativeExecutor(model)
        src_ex = NativeExecutor(source_model) if cross else ex
    for batch in iter_batches(torch.arange(len(pairs)), None, batch_size, torch.device("cpu")):
        sub = pairs[batch.index].to(device)
        base_in, src_in = _direction_inputs(sub, direction)
        if cross:
            src_in = base_in
        mask = sub.attention_mask
        r = read_positions(model, sub, P)
        B = len(sub)
        if method == "fast":
            with torch.inference_mode():
                base_cache = ex.run(base_in, mask, r)
                src_cache = src_ex.run(src_in, mask, r)
                clean_logits = src_cache.logits if (direction == "denoise" or cross) else base_cache.logits
                m_base = evaluate_metric(metric_fn, base_cache.logits, sub, clean_logits)
                m_src = evaluate_metric(metric_fn, src_cache.logits, sub, clean_logits)
                src_acts = _SourceActs(src_cache, src_ex, lmap)
                n_chunk = copies_per_forward or _fast_chunk(B, P, int(model.cfg.d_model), int(model.cfg.d_mlp or 0), H)
                total += _run_fast(ex, base_cache, src_acts, ps, cells, sub, metric_fn, clean_logits, n_chunk)
        else:
            kind = _cell_hook_kind(model, ps.kind, cross)
            cell_layers = sorted(set(cells.layer.tolist()))
            src_layers = [lmap[i] for i in cell_layers] if cross else cell_layers
            src_out, src_store = _capture_batch(source, src_in, mask, _source_sites(kind, src_layers))
            if kind in _DELTA_READ:
                # edits made as deltas: source minus the base run's own value at the target layer
                read = _DELTA_READ[kind]
                base_out, base_store = _capture_batch(model, base_in, mask, _source_sites(kind, cell_layers))
                src_store = {(i, kind): src_store[Site(j, read)] - base_store[Site(i, read)]
                             for i, j in zip(cell_layers, src_layers)}
                src_map = None
            else:
                with torch.inference_mode():
                    base_out = forward(model, base_in, mask)
                src_store = {(site.layer, site.kind): t for site, t in src_store.items()}
                src_map = lmap
            src_logits, base_logits = readout(src_out, r), readout(base_out, r)
            clean_logits = src_logits if (direction == "denoise" or cross) else base_logits
            m_base = evaluate_metric(metric_fn, base_logits, sub, clean_logits)
            m_src = evaluate_metric(metric_fn, src_logits, sub, clean_logits)
            if method == "stacked":
                n_chunk = copies_per_forward or max(1, _stack_rows(device) // max(B, 1))
                for start in range(0, len(cells), n_chunk):
                    idx = torch.arange(start, min(start + n_chunk, len(cells)))
                    out = _stacked_batch(model, base_in, mask, kind, cells, idx, src_store, src_map)
                    N = int(idx.shape[0])
                    logits = readout(out, r.repeat(N))
                    vals = evaluate_metric(metric_fn, logits, _repeat_pairs(sub, N), clean_logits.repeat(N, 1))
                    total[idx] += vals.view(N, B).sum(1).cpu()
            else:
                for c in range(len(cells)):
                    layer, head, pos = int(cells.layer[c]), int(cells.head[c]), int(cells.pos[c])
                    src_layer = layer if src_map is None else src_map[layer]
                    out = _reference_batch(model, base_in, mask, kind, layer, head, pos, src_store[(src_layer, kind)])
                    total[c] += evaluate_metric(metric_fn, readout(out, r), sub, clean_logits).sum().cpu()
        m_base_sum += float(m_base.sum())
        m_src_sum += float(m_src.sum())
    n = len(pairs)
    raw = (total / n).reshape(cells.shape)
    m_base_mean, m_src_mean = m_base_sum / n, m_src_sum / n
    m_clean, m_corrupt = (m_src_mean, m_base_mean) if (direction == "denoise" or cross) else (m_base_mean, m_src_mean)
    values = _normalise(raw, m_clean, m_corrupt) if normalise else raw
    values = values.float()
    if return_result:
        return PatchResult(values=values, raw=raw.float(), clean=m_clean, corrupt=m_corrupt, axes=ps.axes,
                           index=grids, method=method)
    return values


def _stack_rows(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 1024


def _fast_chunk(B: int, P: int, d: int, d_mlp: int, H: int) -> int:
    per_copy = B * P * max(4 * d, d_mlp, H * P) * 4 * 3  # bytes of the widest dense intermediates
    return max(1, int(32e6 // per_copy))


def _run_fast(ex: NativeExecutor, base: _NativeCache, src: _SourceActs, ps: PatchSite, cells: _Cells,
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
            logits = _fast_group(ex, base, src, ps.kind, layer, heads, pos, ps.by_pos)  # [N,B,d_out]
            N = int(idx.shape[0])
            vals = evaluate_metric(metric_fn, logits.reshape(N * B, -1), _repeat_pairs(sub, N), clean_logits.repeat(N, 1))
            total[idx] += vals.view(N, B).sum(1).cpu()
    return total


# ---------------------------------------------------------------------------- path patching


def path_patch(
    model,
    pairs: PromptPairs,
    receivers: Any = "logits",
    metric: MetricArg = None,
    *,
    senders: Optional[Sequence[tuple[int, int]]] = None,
    direction: str = "denoise",
    normalise: bool = True,
    batch_size: int = 64,
    freeze_mlps: bool = True,
) -> Float[Tensor, "layer head"]:
    """Path patching (Wang et al. 2022): each sender head's effect through the receivers only.

    Args:
        receivers: ``"logits"`` (the direct path to the classifier read-out) or a list of
            ``(layer, head, port)`` with port in ``"q" "k" "v"``.
        senders: ``(layer, head)`` heads to test (default: every head in a layer below the lowest receiver).

    Pass 1 runs the base input with every head's ``z`` (and, with ``freeze_mlps``, every
    MLP output) frozen to the base run except the sender's, taken from the source run, and
    records the receivers' q/k/v (or the read-out logits). Pass 2 runs the base input with
    only the receivers' q/k/v replaced by the recorded values. Senders ride in the batch
    dimension. Returns ``Float[layer head]`` with NaN for heads that are not senders.
    """
    _check_pairs(model, pairs)
    metric_fn = resolve_metric(metric, pairs)
    L, H = n_layers(model), n_heads(model)
    to_logits = isinstance(receivers, str)
    if to_logits and receivers != "logits":
        raise CircuitKDError(f"receivers must be 'logits' or a list of (layer, head, port), got {receivers!r}")
    recv: list[tuple[int, int, str]] = []
    if not to_logits:
        for r in receivers:
            if len(r) != 3 or r[2] not in ("q", "k", "v"):
                raise CircuitKDError(f"receiver {r!r} must be (layer, head, port) with port q, k or v")
            layer, head, port = int(r[0]), int(r[1]), r[2]
            hook_name(model, Site(layer, port, head))  # validates layer and head
            recv.append((layer, head, port))
        if not recv:
            raise CircuitKDError("path patching needs at least one receiver")
    top = L if to_logits else min(r[0] for r in recv)
    if senders is None:
        senders = [(layer, h) for layer in range(top) for h in range(H)]
    for s in senders:
        hook_name(model, Site(int(s[0]), "z", int(s[1])))
        if s[0] >= top:
            raise CircuitKDError(f"sender {tuple(s)} is not below the receivers (lowest receiver layer {top})")
    device = model_device(model)
    P = _n_positions(model, pairs)
    S = len(senders)
    total = torch.zeros(S, dtype=torch.float64)
    m_base_sum = m_src_sum = 0.0
    z_sites = [Site(i, "z") for i in range(L)]
    mlp_sites = [Site(i, "mlp_out") for i in range(L)] if (freeze_mlps and has_mlp(model)) else []
    for batch in iter_batches(torch.arange(len(pairs)), None, batch_size, torch.device("cpu")):
        sub = pairs[batch.index].to(device)
        base_in, src_in = _direction_inputs(sub, direction)
        mask = sub.attention_mask
        B = len(sub)
        r = read_positions(model, sub, P)
        base_out, base_store = _capture_batch(model, base_in, mask, z_sites + mlp_sites)
        src_out, src_store = _capture_batch(model, src_in, mask, z_sites)
        base_logits, src_logits = readout(base_out, r), readout(src_out, r)
        clean_logits = src_logits if direction == "denoise" else base_logits
        m_base_sum += float(evaluate_metric(metric_fn, base_logits, sub, clean_logits).sum())
        m_src_sum += float(evaluate_metric(metric_fn, src_logits, sub, clean_logits).sum())
        n_chunk = max(1, _stack_rows(device) // B)
        for start in range(0, S, n_chunk):
            chunk = senders[start:start + n_chunk]
            N = len(chunk)
            rep_in = base_in.repeat((N,) + (1,) * (base_in.dim() - 1))
            rep_mask = None if mask is None else mask.repeat(N, 1)

            def freeze_z(act, *, hook, layer):
                act = base_store[Site(layer, "z")].repeat(N, 1, 1, 1)
                view = act.view((N, B) + tuple(act.shape[1:]))
                for n, (sl, sh) in enumerate(chunk):
                    if sl == layer:
                        view[n, :, :, sh] = src_store[Site(layer, "z")][:, :, sh]
                return act

            def freeze_mlp(act, *, hook, layer):
                return base_store[Site(layer, "mlp_out")].repeat(N, 1, 1)

            recorded: dict = {}

            def record(act, *, hook, key):
                recorded[key] = act.detach().clone()

            hooks1 = [(hook_name(model, s), _bind(freeze_z, layer=s.layer)) for s in z_sites]
            hooks1 += [(hook_name(model, s), _bind(freeze_mlp, layer=s.layer)) for s in mlp_sites]
            ports = sorted({(layer, port) for layer, _, port in recv})
            hooks1 += [(hook_name(model, Site(layer, port)), _bind(record, key=(layer, port))) for layer, port in ports]
            with torch.inference_mode(), edit_hooks(model, hooks1):
                out1 = forward(model, rep_in, rep_mask)
            if to_logits:
                logits = readout(out1, r.repeat(N))
            else:
                def patch_port(act, *, hook, layer, port):
                    act = act.clone()
                    for rl, rh, rp in recv:
                        if rl == layer and rp == port:
                            act[:, :, rh] = recorded[(layer, port)][:, :, rh]
                    return act

                hooks2 = [(hook_name(model, Site(layer, port)), _bind(patch_port, layer=layer, port=port))
                          for layer, port in ports]
                with torch.inference_mode(), edit_hooks(model, hooks2):
                    logits = readout(forward(model, rep_in, rep_mask), r.repeat(N))
            vals = evaluate_metric(metric_fn, logits, _repeat_pairs(sub, N), clean_logits.repeat(N, 1))
            total[start:start + N] += vals.view(N, B).sum(1).cpu()
    n = len(pairs)
    raw = total / n
    m_base, m_src = m_base_sum / n, m_src_sum / n
    m_clean, m_corrupt = (m_src, m_base) if direction == "denoise" else (m_base, m_src)
    vals = _normalise(raw, m_clean, m_corrupt) if normalise else raw
    out = torch.full((L, H), float("nan"), dtype=torch.float32)
    for (sl, sh), v in zip(senders, vals.tolist()):
        out[int(sl), int(sh)] = v
    return out


def _bind(fn, **kw):
    def hook(act, *, hook):
        return fn(act, hook=hook, **kw)
    return hook


# ---------------------------------------------------------------------------- attribution patching


def attribution_patch(
    model,
    pairs: PromptPairs,
    site: str = "head",
    metric: MetricArg = None,
    *,
    direction: str = "denoise",
    normalise: bool = True,
    batch_size: int = 64,
) -> Tensor:
    """Attribution patching (Nanda 2023): ``∂m/∂a · (a_source − a_base)`` for every component at once.

    The first-order estimate of :func:`patch`'s result for the same ``site`` (same axes,
    same normalisation), from one forward and one backward on the base run (plus one
    forward on the source run) per batch. Sums run over the activation's feature axes
    (and over positions / source positions for the ``[layer head]`` and ``[layer]`` forms).
    """
    _check_pairs(model, pairs)
    ps = _site(site)
    _check_kind(model, ps)
    metric_fn = resolve_metric(metric, pairs)
    L, H = n_layers(model), n_heads(model)
    P = _n_positions(model, pairs)
    device = model_device(model)
    sites = [Site(i, ps.kind) for i in range(L)]
    total = torch.zeros((L,) + ((H,) if ps.by_head else ()) + ((P,) if ps.by_pos else ()), dtype=torch.float64)
    m_base_sum = m_src_sum = 0.0
    for batch in iter_batches(torch.arange(len(pairs)), None, batch_size, torch.device("cpu")):
        sub = pairs[batch.index].to(device)
        base_in, src_in = _direction_inputs(sub, direction)
        mask = sub.attention_mask
        r = read_positions(model, sub, P)
        src_out, src_store = _capture_batch(model, src_in, mask, sites)
        store: dict = {}
        with torch.enable_grad(), edit_hooks(model, capture_hooks(model, sites, store, attention_mask=mask, grad=True)):
            base_logits = readout(forward(model, base_in, mask), r)
            src_logits = readout(src_out, r).clone()
            clean_logits = src_logits if direction == "denoise" else base_logits.detach()
            m = evaluate_metric(metric_fn, base_logits, sub, clean_logits)
            m.sum().backward()
        model.zero_grad(set_to_none=True)
        for i, s in enumerate(sites):
            act = store[s]
            if act.grad is None:
                continue
            contrib = (act.grad * (src_store[s] - act.detach())).double()
            total[i] += _reduce_attr(contrib, ps).cpu()
        m_base_sum += float(m.detach().sum())
        m_src_sum += float(evaluate_metric(metric_fn, src_logits, sub, clean_logits).sum())
    n = len(pairs)
    est = total / n
    m_base, m_src = m_base_sum / n, m_src_sum / n
    if not normalise:
        return (m_base + est).float()
    m_clean, m_corrupt = (m_src, m_base) if direction == "denoise" else (m_base, m_src)
    return _normalise(m_base + est, m_clean, m_corrupt).float()


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
