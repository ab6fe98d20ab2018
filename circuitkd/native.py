"""The one readable forward of a TL-native encoder, on the bridge's own weights (nanoGPT style).

A TransformerLens bridge runs every activation through hook points; for training and for
plain class read-outs nothing needs them, and on a small CPU model their overhead is most of
a step. :class:`NativeExecutor` computes the same logits (to 1e-5) top to bottom:
embed -> [LN -> attention -> LN -> MLP] x L -> final LN -> unembed at the read position.
The parameters are the bridge's own ``original_component`` tensors, so gradients reach the
model being trained and nothing is copied.

Everything native in circuitkd runs on this one forward: training and class read-outs
(:func:`class_logits_native`), attention transfer (:func:`patterns_native`, every layer's
pattern with its gradients), the patching fast path and the circuit edge runners
(:meth:`NativeExecutor.run` keeps every activation; :func:`finish` resumes a patched residual
stream from any layer, recomputing only what a patch can change). :func:`attend` is the one
place native attention is computed (:func:`attend_heads` in head-major layout); the resumed
forward adds two exact shortcuts on top of :func:`masked_softmax`: :meth:`NativeExecutor.attend_read`
(one query, no keys or values at every position) and :func:`attend_changed` (keys and values
differ from the base run's at one position).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from circuitkd.errors import CircuitKDError
from circuitkd.hooks import attn_scale

ACTIVATIONS = {
    "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
    "silu": F.silu, "swish": F.silu,
}
#: The same activations in place, for the resumed forward's scratch buffers (:func:`mlp_rows`).
ACTIVATIONS_INPLACE = {
    "gelu": torch.ops.aten.gelu_, "gelu_new": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "relu": torch.relu_, "silu": lambda x: F.silu(x, inplace=True), "swish": lambda x: F.silu(x, inplace=True),
}


def supported(model) -> bool:
    """Whether this forward reproduces ``model``: a TL-native LN model with learned positions and a plain MLP."""
    if type(getattr(model, "original_model", None)).__name__ != "NativeModel":
        return False
    cfg = model.cfg
    return (
        str(cfg.normalization_type).upper() == "LN"
        and (cfg.positional_embedding_type or "standard") == "standard"
        and (cfg.n_key_value_heads in (None, cfg.n_heads))
        and float(cfg.attn_scores_soft_cap) <= 0
        and float(cfg.output_logits_soft_cap) <= 0
        and not cfg.gated_mlp
        and (cfg.act_fn or "gelu").lower() in ACTIVATIONS
        and not getattr(cfg, "final_rms", False)
    )


def blocked_mask(mask: Optional[Tensor], n_pos: int, causal: bool, device) -> Tensor:
    """``Bool[batch|1, 1, dest_pos, src_pos]``: True where attention is not allowed."""
    blocked = torch.zeros(n_pos, n_pos, dtype=torch.bool, device=device)
    if causal:
        blocked = torch.triu(torch.ones(n_pos, n_pos, dtype=torch.bool, device=device), diagonal=1)
    blocked = blocked[None, None]
    if mask is not None:
        blocked = blocked | ~mask.bool()[:, None, None, :]
    return blocked


def attend(q: Float[Tensor, "... dest_pos head d_head"], k: Float[Tensor, "... src_pos head d_head"],
           v: Float[Tensor, "... src_pos head d_head"], blocked: Tensor, scale: float
           ) -> tuple[Float[Tensor, "... dest_pos head d_head"], Float[Tensor, "... head dest_pos src_pos"]]:
    """Softmax attention: ``(z, pattern)``. Rows with nothing to attend to get a zero pattern, as TL's.

    Position-major layout (TransformerLens's); :func:`attend_heads` computes it head-major.
    """
    z, pattern = attend_heads(q.transpose(-2, -3), k.transpose(-2, -3), v.transpose(-2, -3), blocked, scale)
    return z.transpose(-2, -3), pattern


def attend_heads(q: Float[Tensor, "... head dest_pos d_head"], k: Float[Tensor, "... head src_pos d_head"],
                 v: Float[Tensor, "... head src_pos d_head"], blocked: Tensor, scale: float
                 ) -> tuple[Float[Tensor, "... head dest_pos d_head"], Float[Tensor, "... head dest_pos src_pos"]]:
    """Softmax attention, head-major: ``(z, pattern)``; ``blocked`` broadcasts to the pattern's shape.

    One query per head (a read-out row) takes broadcast products instead of matmuls with a
    dimension of 1, whose batched backward is an outer product per head and several times slower.
    """
    if q.shape[-2] == 1:
        pattern = masked_softmax((q * k).sum(-1).unsqueeze(-2) / scale, blocked)
        return (pattern.transpose(-1, -2) * v).sum(-2, keepdim=True), pattern
    pattern = masked_softmax(torch.matmul(q, k.transpose(-1, -2)) / scale, blocked)
    return torch.matmul(pattern, v), pattern


#: PyTorch's CPU softmax kernel is vectorised for rows of at least this many entries; shorter rows
#: (a 15-token NLI input) take a scalar path about 15x slower per entry (torch 2.13, AVX-512), so
#: :func:`masked_softmax` pads them with ``-inf`` (weight exactly 0) to this length and slices back.
_SOFTMAX_MIN_ROW = 16


def masked_softmax(scores: Float[Tensor, "... dest_pos src_pos"], blocked: Tensor) -> Float[Tensor, "... dest_pos src_pos"]:
    """The attention pattern from scaled scores: blocked keys get no weight, and a row with every key
    blocked (an all-padding input) is all zeros rather than NaN, as TransformerLens's attention."""
    # one host sync for both questions; with nothing blocked (no padding, not causal) neither mask pass runs
    any_blocked, row_blocked = torch.stack([blocked.any(), blocked.all(-1).any()]).tolist()
    if any_blocked:
        scores = scores.masked_fill(blocked, float("-inf"))
    n_src = scores.shape[-1]
    if scores.device.type == "cpu" and n_src < _SOFTMAX_MIN_ROW:
        padded = F.pad(scores, (0, _SOFTMAX_MIN_ROW - n_src), value=float("-inf"))
        pattern = torch.softmax(padded, dim=-1)[..., :n_src]
    else:
        pattern = torch.softmax(scores, dim=-1)
    if row_blocked:
        pattern = pattern.masked_fill(blocked, 0.0)
    return pattern


class NativeExecutor:
    """A TL-native model's forward, layer by layer, on the bridge's own weights (nanoGPT's
    ``Block.forward``, written out): :meth:`forward` for logits with gradients, :meth:`run` for
    every activation (the patching and circuit fast paths). Both equal the bridge to 1e-5.
    """

    def __init__(self, model):
        if not supported(model):
            raise CircuitKDError("the native forward supports TL-native LN models with learned positions and a "
                                 f"plain MLP only; got {type(getattr(model, 'original_model', model)).__name__}")
        cfg = model.cfg
        self.model = model
        self.L, self.H, self.dh, self.d = int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_head), int(cfg.d_model)
        self.causal = cfg.attention_dir == "causal"
        self.attn_only = bool(cfg.attn_only)
        self.act_name = (cfg.act_fn or "gelu").lower()
        self.act = ACTIVATIONS[self.act_name]
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
        self.scale = attn_scale(model)

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
        """``Bool[batch|1, 1, dest, src]``: True where attention is not allowed (:func:`blocked_mask`)."""
        return blocked_mask(mask, P, self.causal, device)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, blocked: Tensor) -> tuple[Tensor, Tensor]:
        """q ``[..., dest, head, dh]``, k/v ``[..., src, head, dh]`` -> (z ``[..., dest, head, dh]``, pattern ``[..., head, dest, src]``)."""
        return attend(q, k, v, blocked, self.scale)

    def attend_read(self, layer: int, h: Tensor, q: Tensor, blocked: Tensor) -> Tensor:
        """``z`` ``[..., head, dh]`` of one query per example (``q`` ``[..., head, dh]``) over the normalised
        stream ``h`` ``[..., src, d]`` of layer ``layer``, without forming keys and values at every position:
        ``q . k_j = h_j . (W_K^T q) + b_K . q`` (the last term is the same for every ``j``, so the softmax
        drops it) and ``sum_j a_j v_j = (sum_j a_j h_j) W_V^T + (sum_j a_j) b_V`` (``d_model`` work per source
        position instead of ``d_model^2``). ``blocked``: ``[..., 1, src]`` broadcastable to ``[..., head, src]``.
        Equals :meth:`attend` at that query to float rounding."""
        p = self.layers[layer]
        Wk, Wv = p["k"].weight.view(self.H, self.dh, -1), p["v"].weight.view(self.H, self.dh, -1)  # [H dh d]
        u = torch.einsum("...he,hed->...hd", q, Wk)
        scores = torch.einsum("...pd,...hd->...hp", h, u)
        pattern = masked_softmax(scores / self.scale, blocked)
        mixed = torch.einsum("...hp,...pd->...hd", pattern, h)
        return torch.einsum("...hd,hed->...he", mixed, Wv) + pattern.sum(-1, keepdim=True) * p["v"].bias.view(self.H, self.dh)

    def out(self, layer: int, z: Tensor) -> Tensor:
        o = self.layers[layer]["o"]
        return F.linear(z.flatten(-2), o.weight, o.bias)

    def logits(self, x: Tensor) -> Tensor:
        return F.linear(self.ln(x, self.lnf), self.unembed.weight, self.unembed.bias)

    def forward(self, tokens: Int[Tensor, "batch pos"], mask: Optional[Tensor], read_pos: Optional[Tensor],
                patterns: Optional[list] = None) -> tuple[Tensor, Tensor]:
        """``(logits [batch d_out], hidden [batch d_model])`` at ``read_pos`` (default 0), keeping
        gradients; appends each layer's pattern ``[batch head dest src]`` to ``patterns`` when given.
        ``hidden`` is the final residual stream after the final LayerNorm, the classifier's input.

        The training forward, so written for speed: one fused q/k/v projection per layer, heads
        kept in ``[batch, head, pos, d_head]`` for batched matmuls, and (unless ``patterns`` is
        asked for) the last layer computes its query, attention output and MLP only at the read
        position, the one row the logits depend on. Equals :meth:`run`'s logits to float rounding.
        """
        B, P = tokens.shape
        ar = torch.arange(B, device=tokens.device)
        read = torch.zeros(B, dtype=torch.long, device=tokens.device) if read_pos is None else read_pos
        x = F.embedding(tokens, self.tok) + self.pos[:P][None]
        blocked = self.blocked(mask, P, tokens.device)  # [B|1, 1, P, P]
        H, dh, d = self.H, self.dh, self.d
        for i, p in enumerate(self.layers):
            h = self.ln(x, p["ln1"])
            w, b = qkv_params(self, i)
            if i == self.L - 1 and patterns is None:
                k, v = F.linear(h, w[d:], b[d:]).view(B, P, 2, H, dh).unbind(2)  # [B, P, H, dh] each
                q = F.linear(h[ar, read], w[:d], b[:d]).view(B, 1, H, dh)
                rows = blocked.expand(B, -1, -1, -1)[ar, :, read].unsqueeze(-2)  # [B, 1, 1, P]
                z, _ = attend(q, k, v, rows, self.scale)  # [B, 1, H, dh]
                x = self.mlp(i, x[ar, read] + self.out(i, z[:, 0]))
                return self._read_out(x)
            # unbind, not indexing: its backward stacks the three gradients instead of filling zeros thrice.
            q, k, v = F.linear(h, w, b).view(B, P, 3, H, dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, P, dh]
            z, pattern = attend_heads(q, k, v, blocked, self.scale)
            if patterns is not None:
                patterns.append(pattern)
            z = z.transpose(1, 2)  # [B, P, H, dh]
            x = self.mlp(i, x + self.out(i, z))
        return self._read_out(x[ar, read])

    def _read_out(self, x: Float[Tensor, "batch d_model"]) -> tuple[Tensor, Tensor]:
        hidden = self.ln(x, self.lnf)
        return F.linear(hidden, self.unembed.weight, self.unembed.bias), hidden

    # -- full forward with cache
    def run(self, tokens: Tensor, mask: Optional[Tensor], read_pos: Tensor) -> "NativeCache":
        B, P = tokens.shape
        x = self.tok[tokens] + self.pos[:P][None]
        blocked = self.blocked(mask, P, tokens.device)
        c = NativeCache(blocked=blocked, read_pos=read_pos)
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
class NativeCache:
    """Every activation of one :meth:`NativeExecutor.run`, per layer, and the read positions."""

    blocked: Tensor
    read_pos: Tensor
    logits: Optional[Tensor] = None
    scratch: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("resid_pre", "q", "k", "v", "z", "pattern", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, name, [])

    def buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A scratch tensor of ``shape`` for the resumed forwards on this cache, reused by every call
        that asks for ``name`` (the patched copies come in chunks of equal shape): allocating the tens
        of MB of a dense layer afresh per chunk costs more in page faults than its MLP's matmuls.
        Whatever the previous use of ``name`` left in it is overwritten."""
        n = math.prod(shape)
        buf = self.scratch.get(name)
        if buf is None or buf.numel() < n:
            buf = self.scratch[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)

    def head_major(self, name: str, layer: int) -> Tensor:
        """Layer ``layer``'s keys (``"k_t"``: ``[batch, head, d_head, pos]``, ready to multiply queries by)
        or values (``"v"``: ``[batch, head, pos, d_head]``), contiguous, made once per cache: the resumed
        forwards multiply by them once per chunk of copies, and a strided operand is copied every time."""
        key = (name, layer)
        if key not in self.scratch:
            t = self.k[layer].permute(0, 2, 3, 1) if name == "k_t" else self.v[layer].transpose(1, 2)
            self.scratch[key] = t.contiguous()
        return self.scratch[key]

    def at_read(self, name: str, layer: int) -> Tensor:
        """``[batch, ...]``: the cached activation at each example's read position."""
        t = getattr(self, name)[layer]
        return t[torch.arange(t.shape[0], device=t.device), self.read_pos]


# ---------------------------------------------------------------------------- resuming a patched forward
# Patched states of the residual stream for N copies of a B-example batch:
#   ("sparse", pos[N], vec[N,B,d]) - equals the base run except at one position per copy;
#   ("dense", x[N,B,P,d]);  ("read", x[N,B,d]) - only each example's read-out position.
# What follows runs without gradients only (the patching and circuit fast paths): the dense layers
# write into the cache's scratch buffers (:meth:`NativeCache.buffer`), so a "dense" state they return
# is overwritten by the next resumed layer; the training forward above never comes here.


def read_of_sparse(ex: NativeExecutor, c: NativeCache, base_name: str, layer: int, pos: Tensor, vec: Tensor) -> Tensor:
    """``[N,B,d]`` at each example's read position: the patched vector where ``pos == read_pos``."""
    base_r = c.at_read(base_name, layer).unsqueeze(0).expand_as(vec)
    hit = (pos[:, None] == c.read_pos[None, :])[..., None]
    return torch.where(hit, vec, base_r)


def qkv_params(ex: NativeExecutor, i: int) -> tuple[Tensor, Tensor]:
    """Layer ``i``'s q/k/v projections as one: weight ``[3*d, d]``, bias ``[3*d]``."""
    p = ex.layers[i]
    return torch.cat([p["q"].weight, p["k"].weight, p["v"].weight]), torch.cat([p["q"].bias, p["k"].bias, p["v"].bias])


#: Rows (copies x examples x positions) a resumed layer's dense part works on at once: its intermediates
#: (the MLP's hidden activations, 1,536 rows x 512 = 3 MB on the teacher) then stay near a core's L2
#: cache, and a teacher layer runs ~25 % faster per row than on 4,608 rows at once (1 thread, issue 15).
BLOCK_ROWS = 2048


def copy_blocks(x: Tensor) -> list[slice]:
    """Slices of the copy axis of ``x`` ``[N,B,P,...]`` of about :data:`BLOCK_ROWS` rows each."""
    step = max(1, BLOCK_ROWS // (x.shape[1] * x.shape[2]))
    return [slice(s, s + step) for s in range(0, x.shape[0], step)]


def layer_out(c: NativeCache, i: int, like: Tensor) -> Tensor:
    """The scratch buffer for layer ``i``'s resid_post; two alternate, so that no layer writes over its input."""
    return c.buffer(f"resid_post{i % 2}", tuple(like.shape), like)


def mlp_rows(ex: NativeExecutor, c: NativeCache, i: int, mid: Float[Tensor, "rows d_model"],
             out: Float[Tensor, "rows d_model"]) -> Float[Tensor, "rows d_model"]:
    """:meth:`NativeExecutor.mlp` (resid mid -> resid post) written into ``out``; ``mid`` is only read."""
    if ex.attn_only:
        return out.copy_(mid)
    p = ex.layers[i]
    fc_in, fc_out = p["fc_in"], p["fc_out"]
    hidden = torch.addmm(fc_in.bias, ex.ln(mid, p["ln2"]), fc_in.weight.t(),
                         out=c.buffer("hidden", (mid.shape[0], fc_in.weight.shape[0]), mid))
    ACTIVATIONS_INPLACE[ex.act_name](hidden)
    return torch.addmm(mid, hidden, fc_out.weight.t(), out=out).add_(fc_out.bias)


def mlp_into(ex: NativeExecutor, c: NativeCache, i: int, mid: Float[Tensor, "N batch pos d_model"]
             ) -> Float[Tensor, "N batch pos d_model"]:
    """Layer ``i``'s MLP at every position of N copies, :data:`BLOCK_ROWS` at a time, into :func:`layer_out`."""
    out = layer_out(c, i, mid)
    for s in copy_blocks(mid):
        mlp_rows(ex, c, i, mid[s].reshape(-1, ex.d), out[s].view(-1, ex.d))
    return out


def dense_layer(ex: NativeExecutor, c: NativeCache, i: int, x: Float[Tensor, "N batch pos d_model"]
                ) -> Float[Tensor, "N batch pos d_model"]:
    """Layer ``i`` at every position of N patched copies: resid_pre -> resid_post (:func:`layer_out`),
    :data:`BLOCK_ROWS` at a time, in scratch buffers: one fused q/k/v matmul, heads batch-major for the
    attention's batched matmuls."""
    out = layer_out(c, i, x)
    H, dh, d = ex.H, ex.dh, ex.d
    p = ex.layers[i]
    w, b = qkv_params(ex, i)
    for s in copy_blocks(x):
        N, B, P, _ = x[s].shape
        rows = N * B * P
        x_rows = x[s].reshape(rows, d)
        qkv = torch.mm(ex.ln(x_rows, p["ln1"]), w.t(), out=c.buffer("qkv", (rows, 3 * H * dh), x))
        heads = c.buffer("qkv_heads", (3, N, B, H, P, dh), x)  # the bias added on the way to heads-major
        torch.add(qkv.view(N, B, P, 3, H, dh).permute(3, 0, 1, 4, 2, 5), b.view(3, 1, 1, H, 1, dh), out=heads)
        z, _ = attend_heads(*heads.unbind(0), c.blocked, ex.scale)  # [N,B,H,P,dh]
        z = c.buffer("z", (N, B, P, H, dh), x).copy_(z.transpose(2, 3))
        mid = torch.addmm(x_rows, z.view(rows, H * dh), p["o"].weight.t(), out=c.buffer("mid", (rows, d), x))
        mlp_rows(ex, c, i, mid.add_(p["o"].bias), out[s].view(rows, d))
    return out


def attend_changed(ex: NativeExecutor, c: NativeCache, i: int, q: Float[Tensor, "batch head N dest_pos d_head"],
                   pos: Int[Tensor, " N"], k_new: Float[Tensor, "N batch head d_head"],
                   v_new: Float[Tensor, "N batch head d_head"], blocked: Tensor) -> Float[Tensor, "batch head N dest_pos d_head"]:
    """Layer ``i``'s attention output of N patched copies whose key and value differ from the base run's
    at one source position each (``pos[n]``, new ``k_new[n]``, ``v_new[n]``), for queries ``q``:
    copy n's scores are ``q . k_base`` with column ``pos[n]`` replaced, and its output is
    ``pattern @ v_base`` with that column's weight moved onto ``v_new`` -- no per-copy keys or values.
    ``blocked`` broadcasts to ``[batch, head, N, dest_pos, src_pos]``."""
    B, H, N, R, dh = q.shape
    ar = torch.arange(N, device=pos.device)
    k_base_t, v_base = c.head_major("k_t", i), c.head_major("v", i)  # [B,H,dh,P], [B,H,P,dh]
    scores = torch.matmul(q.reshape(B, H, N * R, dh), k_base_t).view(B, H, N, R, -1)
    new_col = torch.matmul(q, k_new.permute(1, 2, 0, 3).unsqueeze(-1))[..., 0]  # [B,H,N,R]
    scores[:, :, ar, :, pos] = new_col.permute(2, 0, 1, 3)
    pattern = masked_softmax(scores.div_(ex.scale), blocked)
    weight_new = pattern[:, :, ar, :, pos].permute(1, 2, 0, 3)  # [B,H,N,R]
    pattern[:, :, ar, :, pos] = 0.0
    z = torch.matmul(pattern.reshape(B, H, N * R, -1), v_base).view(B, H, N, R, dh)
    return z.addcmul_(weight_new.unsqueeze(-1), v_new.permute(1, 2, 0, 3).unsqueeze(-2))


def sparse_layer(ex: NativeExecutor, c: NativeCache, i: int, pos: Tensor, vec: Tensor) -> tuple:
    """Layer ``i`` on a resid_pre that differs from the base run at one position per copy (``pos[n]``,
    ``vec[n]`` ``[B,d]``): only that position's q/k/v are new (:func:`attend_changed`); every position's
    attention output, and so its MLP, changes. The last layer computes the read-out position only."""
    N, B = vec.shape[:2]
    P, H, dh, d = c.q[i].shape[1], ex.H, ex.dh, ex.d
    p = ex.layers[i]
    ar = torch.arange(N, device=pos.device)
    w, b = qkv_params(ex, i)
    q_new, k_new, v_new = F.linear(ex.ln(vec, p["ln1"]), w, b).view(N, B, 3, H, dh).unbind(2)  # [N,B,H,dh]
    if i == ex.L - 1:
        ar_b = torch.arange(B, device=pos.device)
        hit = (pos[:, None] == c.read_pos[None, :])[..., None, None]
        q_read = torch.where(hit, q_new, c.q[i][ar_b, c.read_pos].unsqueeze(0))  # [N,B,H,dh]
        blocked_read = c.blocked.expand(B, -1, -1, -1)[ar_b, :, c.read_pos][:, :, None, None]  # [B,1,1,1,P]
        z = attend_changed(ex, c, i, q_read.permute(1, 2, 0, 3).unsqueeze(-2), pos, k_new, v_new, blocked_read)
        pre_read = read_of_sparse(ex, c, "resid_pre", i, pos, vec)
        return ("read", ex.mlp(i, pre_read + ex.out(i, z[..., 0, :].permute(2, 0, 1, 3))))
    q = c.buffer("q_rows", (B, H, N, P, dh), vec)
    q.copy_(c.q[i].permute(0, 2, 1, 3).unsqueeze(2).expand(B, H, N, P, dh))
    q[:, :, ar, pos] = q_new.permute(1, 2, 0, 3)
    z = attend_changed(ex, c, i, q, pos, k_new, v_new, c.blocked[:, :, None])  # [B,H,N,P,dh]
    rows = N * B * P
    z = c.buffer("z", (N, B, P, H, dh), vec).copy_(z.permute(2, 0, 3, 1, 4))
    mid = torch.addmm(p["o"].bias, z.view(rows, H * dh), p["o"].weight.t(), out=c.buffer("mid", (rows, d), vec))
    mid = mid.view(N, B, P, d)
    attn_at_pos = mid[ar, :, pos]  # [N,B,d]
    mid += c.resid_pre[i]
    mid[ar, :, pos] = vec + attn_at_pos
    return ("dense", mlp_into(ex, c, i, mid))


def resume_layer(ex: NativeExecutor, c: NativeCache, i: int, state: tuple) -> tuple:
    """Run layer ``i`` on a patched resid_pre state; returns the resid_pre state of layer ``i+1`` (or "read")."""
    kind = state[0]
    if kind == "read":
        raise CircuitKDError("internal: a read-out state cannot enter another layer")  # pragma: no cover
    if kind == "sparse":
        return sparse_layer(ex, c, i, state[1], state[2])
    x = state[1]  # dense [N,B,P,d]
    if i < ex.L - 1:
        return ("dense", dense_layer(ex, c, i, x))
    # the last layer: only the read query reaches the output, so no keys or values at every position
    p = ex.layers[i]
    B = c.read_pos.shape[0]
    ar = torch.arange(B, device=c.read_pos.device)
    h = ex.ln(x, p["ln1"])
    x_r = x[:, ar, c.read_pos]  # [N,B,d]
    q_r = ex.heads(p["q"], h[:, ar, c.read_pos])  # [N,B,H,dh]
    blocked_r = c.blocked.expand(B, -1, -1, -1)[ar, :, c.read_pos]  # [B,1,P]
    return ("read", ex.mlp(i, x_r + ex.out(i, ex.attend_read(i, h, q_r, blocked_r))))


def after_mid(ex: NativeExecutor, c: NativeCache, i: int, state: tuple) -> tuple:
    """A patched resid_mid state of layer ``i`` -> the resid_pre state of layer ``i+1`` (or "read")."""
    last = i == ex.L - 1
    if state[0] == "sparse":
        _, pos, vec = state
        if not last:
            return ("sparse", pos, ex.mlp(i, vec))
        # the last layer's MLP matters only where the patched position is the read position
        hit = pos[:, None] == c.read_pos[None, :]  # [N,B]
        post = c.at_read("resid_post", i).unsqueeze(0).expand_as(vec).clone()
        post[hit] = ex.mlp(i, vec[hit])
        return ("read", post)
    x = state[1]
    if last:
        ar = torch.arange(x.shape[1], device=x.device)
        return ("read", ex.mlp(i, x[:, ar, c.read_pos]))
    return ("dense", mlp_into(ex, c, i, x))


def finish(ex: NativeExecutor, c: NativeCache, start: int, state: tuple) -> Tensor:
    """Propagate a resid_pre state from layer ``start`` to the read-out logits ``[N,B,d_out]``."""
    i = start
    while state[0] != "read":
        if i == ex.L:  # a sparse/dense state past the last block: read it
            if state[0] == "sparse":
                state = ("read", read_of_sparse(ex, c, "resid_post", ex.L - 1, state[1], state[2]))
            else:
                ar = torch.arange(state[1].shape[1], device=state[1].device)
                state = ("read", state[1][:, ar, c.read_pos])
            break
        state = resume_layer(ex, c, i, state)
        i += 1
    return ex.logits(state[1])



def class_logits_native(model, tokens: Int[Tensor, "batch pos"], attention_mask: Optional[Tensor] = None,
                        read_pos: Optional[Int[Tensor, " batch"]] = None, *, return_hidden: bool = False):
    """Logits ``[batch, d_vocab_out]`` at ``read_pos`` (default 0, the CLS token) of a native bridge.

    With ``return_hidden`` also returns the classifier's input, the final residual stream at the
    read position after the final LayerNorm (``[batch, d_model]``), what learned-mixin's gate reads.
    """
    logits, hidden = NativeExecutor(model).forward(tokens, attention_mask, read_pos)
    return (logits, hidden) if return_hidden else logits


def patterns_native(model, tokens: Int[Tensor, "batch pos"], attention_mask: Optional[Tensor] = None,
                    read_pos: Optional[Int[Tensor, " batch"]] = None
                    ) -> tuple[Float[Tensor, "batch d_vocab_out"], Float[Tensor, "batch layer head dest_pos src_pos"]]:
    """``(logits, patterns)`` of a native bridge from one forward, the patterns keeping their gradients.

    ``logits`` are :func:`class_logits_native`'s; ``patterns`` stacks every layer's attention
    pattern (rows of padded destinations attend over real sources; fully blocked rows are zero).
    What attention-transfer distillation trains on.
    """
    patterns: list[Tensor] = []
    logits, _ = NativeExecutor(model).forward(tokens, attention_mask, read_pos, patterns)
    return logits, torch.stack(patterns, dim=1)
