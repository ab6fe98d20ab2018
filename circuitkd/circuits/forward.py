"""The edge-patched forward pass every circuit method runs (the interventions of Conmy et al. 2023).

Ablating edge ``src -> dst<port>`` means: ``dst`` reads, at that port, the residual stream
in which ``src``'s output is replaced by a *replacement* value (its output on the corrupt
input, its mean, or zero) while every other reader sees the real ``src``. In a pre-LN model
the reader's input is ``LN(resid + sum_src w_src (replacement_src - current_src))`` where
``current_src`` is ``src``'s output in this very run; we rebuild it with the block's own
LayerNorm module and recompute that head's query/key/value (or the MLP's input, or the
readout) from it. Many ablation patterns ride in the batch dimension of one forward
(``ablate[k]`` for copy ``k``), so exact patching and ACDC evaluate many candidates at once.

**Post-LN models (BERT).** There a block computes ``h' = LN_a(h + attn(h))`` and
``h_out = LN_b(h' + mlp(h'))``; the stream a reader sees is *not* a sum of upstream outputs,
so an edge is not defined by the architecture. circuitkd defines it by freezing every
stream LayerNorm's scale ``sigma`` at its value in the clean run (the run whose edges are
scored). Each norm is then affine, ``LN(x) = gamma * (x - mean(x)) / sigma_clean + beta``,
so every reader's input is an affine function of the upstream outputs: a source's
contribution reaches a reader through the chain of the linear parts of the norms between
them. The forward carries each source's ``replacement - current`` difference along the
stream, applying each frozen norm's linear part to it, and adds the ablated ones at the
reader. With nothing ablated it reproduces the clean run exactly (the scales are the clean
ones); with edges ablated it differs from real patching only by the change of the norms'
scales, which :func:`circuitkd.circuits.postln.validate_post_ln` measures against real
(node) patching. Where that disagreement is large, use node-level circuits (real
patching of each component's output, no frozen norms).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from circuitkd import hooks
from circuitkd.circuits.graph import HEAD_PORTS, ComponentGraph
from circuitkd.circuits.paths import native_allowed
from circuitkd.engine import forward as engine_forward
from circuitkd.errors import CircuitKDError
from circuitkd.hooks import Site
from circuitkd import native
from circuitkd.native import masked_softmax


@dataclass
class SourceValues:
    """Every source's output on one batch (``[batch pos source d_model]``), the logits and,
    for post-LN models, each stream norm's scale ``{(layer, "ln1"|"ln2"): [batch pos 1]}``."""

    outputs: Tensor
    logits: Tensor
    norm_scales: dict = field(default_factory=dict)


def _norm_sigma(module, x: Tensor) -> Tensor:
    return torch.sqrt(x.float().var(-1, keepdim=True, unbiased=False) + module.eps).to(x.dtype)


def source_values(model, graph: ComponentGraph, inputs: Tensor,
                  attention_mask: Optional[Tensor] = None) -> SourceValues:
    """One plain forward recording every source's output (and post-LN norm scales).

    On native pre-LN models with token inputs the forward runs on the weights without hooks
    (:class:`circuitkd.native.NativeExecutor`, equal to the bridge to float rounding); elsewhere
    through the bridge's hooks.
    """
    if native_allowed() and not graph.post_ln and not inputs.is_floating_point():
        if native.supported(model):
            return _native_source_values(model, graph, inputs, attention_mask)
    store: dict = {}
    fwd = []

    def keep(key):
        def fn(act, *, hook):
            store[key] = act.detach()
        return fn

    fwd.append((hooks.hook_name(model, Site(None, "embed")), keep("embed")))
    for layer in range(graph.n_layers):
        fwd.append((hooks.hook_name(model, Site(layer, "z")), keep(("z", layer))))
        if graph.has_mlp:
            fwd.append((hooks.hook_name(model, Site(layer, "mlp_out")), keep(("mlp", layer))))
        if graph.post_ln:
            for norm in ("ln1", "ln2"):
                fwd.append((hooks.norm_hook_names(model, layer, norm)[0], keep((norm, layer))))
    with torch.no_grad(), hooks.edit_hooks(model, fwd):
        logits = engine_forward(model, inputs, attention_mask)
    parts = [store["embed"][:, :, None]]
    scales = {}
    for layer in range(graph.n_layers):
        parts.append(hooks.head_output(model, layer, store[("z", layer)]))
        if graph.has_mlp:
            parts.append(store[("mlp", layer)][:, :, None])
        if graph.post_ln:
            for norm in ("ln1", "ln2"):
                scales[(layer, norm)] = _norm_sigma(hooks.norm_module(model, layer, norm), store[(norm, layer)])
    return SourceValues(torch.cat(parts, 2), logits.detach(), scales)




def _native_source_values(model, graph: ComponentGraph, inputs: Tensor,
                          attention_mask: Optional[Tensor]) -> SourceValues:
    ex = native.NativeExecutor(model)
    with torch.no_grad():
        c = ex.run(inputs, attention_mask, torch.zeros(inputs.shape[0], dtype=torch.long, device=inputs.device))
        parts = [c.resid_pre[0][:, :, None]]
        for layer in range(graph.n_layers):
            parts.append(torch.einsum("bphd,hdm->bphm", c.z[layer], ex.layers[layer]["W_O"]))
            if graph.has_mlp:
                parts.append(c.mlp_out[layer][:, :, None])
        logits = ex.logits(c.resid_post[-1])
    return SourceValues(torch.cat(parts, 2).detach(), logits.detach(), {})


@dataclass
class PatchedRun:
    """What :func:`patched_forward` returns: logits ``[copies*batch, ...]``, and when asked the
    reader-input leaves (``.grad`` after backward) and each reader group's source differences
    as seen at that reader (``[copies*batch pos source d_model]``)."""

    logits: Tensor
    leaves: dict = field(default_factory=dict)
    deltas: dict = field(default_factory=dict)


class _EdgeForward:
    def __init__(self, model, graph, *, n_copies, batch, ablate, node_ablate, replacement,
                 norm_scales, reader_grads, embed_override, record_deltas):
        self.model, self.g = model, graph
        self.K, self.B = n_copies, batch
        self.ablate, self.node_ablate = ablate, node_ablate
        self.rep = replacement
        self.scales = norm_scales
        self.reader_grads, self.record = reader_grads, record_deltas
        self.embed_override = embed_override
        self.D: Optional[Tensor] = None  # [N pos S_avail d_model]: replacement - current, at the current stream point
        self.stream: dict = {}
        self.leaves: dict = {}
        self.deltas: dict = {}
        self.cur_heads: dict = {}
        self.norm_in: dict = {}

    # ---------------------------------------------------------------- helpers
    def _append_sources(self, cur: Tensor, sl: slice) -> None:
        """Add sources ``sl`` (current outputs ``cur`` [N pos n d]) to the carried differences."""
        if self.ablate is None and not self.record:
            return
        K, B = self.K, self.B
        n, p, g, d = cur.shape
        rep = self.rep[:, :, sl].to(cur.dtype)
        diff = (rep[None] - cur.view(K, B, p, g, d)).reshape(n, p, g, d)
        self.D = diff if self.D is None else torch.cat([self.D, diff], 2)

    def _weights(self, readers) -> Optional[Tensor]:
        """Ablation weights ``[K (pos) S_avail R]`` for reader indices, or None when nothing is ablated."""
        if self.ablate is None:
            return None
        s_avail = self.D.shape[2]
        w = self.ablate[..., :s_avail, readers]
        # a zero weight that carries a gradient (a naive per-edge derivative) still takes the patched path
        return w if (w.requires_grad or bool((w != 0).any())) else None

    def _delta(self, w: Tensor) -> Tensor:
        K, B = self.K, self.B
        n, p, s, d = self.D.shape
        D = self.D.view(K, B, p, s, d)
        w = w.to(D.dtype)
        if w.dim() == 3:
            out = torch.einsum("kbpsd,ksr->kbprd", D, w)
        else:
            out = torch.einsum("kbpsd,kpsr->kbprd", D, w)
        return out.reshape(n, p, out.shape[-2], d)

    def _leaf(self, key, shape, like: Tensor) -> Optional[Tensor]:
        if not self.reader_grads:
            return None
        leaf = torch.zeros(shape, dtype=like.dtype, device=like.device, requires_grad=True)
        self.leaves[key] = leaf
        return leaf

    def _snapshot(self, key) -> None:
        if self.record and self.D is not None:
            self.deltas[key] = self.D.detach()

    # ---------------------------------------------------------------- hooks
    def hook_list(self):
        m, g = self.model, self.g
        out = []
        for layer in range(g.n_layers):
            out.append((hooks.hook_name(m, Site(layer, "resid_pre")), self._resid_pre(layer)))
            for port in HEAD_PORTS:
                out.append((hooks.hook_name(m, Site(layer, port)), self._qkv(layer, port)))
            out.append((hooks.hook_name(m, Site(layer, "z")), self._z(layer)))
            if self.node_ablate is not None:
                out.append((hooks.hook_name(m, Site(layer, "attn_out")), self._attn_out_node(layer)))
            if g.post_ln:
                out += self._frozen_norm(layer, "ln1")
            if g.has_mlp:
                if not g.post_ln:
                    out.append((hooks.hook_name(m, Site(layer, "resid_mid")), self._keep_stream(("mid", layer))))
                out.append((hooks.mlp_input_hook_name(m, layer), self._mlp_in(layer)))
                out.append((hooks.hook_name(m, Site(layer, "mlp_out")), self._mlp_out(layer)))
            if g.post_ln and g.has_mlp:
                out += self._frozen_norm(layer, "ln2")
        if not g.post_ln:
            out.append((hooks.hook_name(m, Site(None, "final")), self._keep_stream("final")))
        out.append((hooks.readout_hook_name(m), self._readout()))
        return out

    def _keep_stream(self, key):
        def fn(act, *, hook):
            self.stream[key] = act
        return fn

    def _resid_pre(self, layer):
        def fn(act, *, hook):
            if layer == 0:
                if self.embed_override is not None:
                    act = self.embed_override.to(act.dtype)
                if self.node_ablate is not None:
                    w = self.node_ablate[:, 0].to(act.dtype).view(self.K, 1, 1, 1)
                    rep = self.rep[None, :, :, 0].to(act.dtype)
                    cur = act.view(self.K, self.B, *act.shape[1:])
                    act = (cur + w * (rep - cur)).reshape(act.shape)
                self._append_sources(act[:, :, None], self.g.source_slice("embed"))
            self.stream[("pre", layer)] = act
            return act
        return fn

    def _qkv(self, layer, port):
        g = self.g
        heads = g.reader_slice("head", layer)
        readers = list(range(heads.start + HEAD_PORTS.index(port), heads.stop, 3))

        def fn(act, *, hook):
            if port == "q":
                self._snapshot(("attn", layer))
            w = self._weights(readers) if self.D is not None else None
            stream = self.stream[("pre", layer)]
            n, p, d = stream.shape
            leaf = self._leaf((layer, port), (n, p, g.n_heads, d), stream)
            if w is None and leaf is None:
                return act
            x = stream[:, :, None, :].expand(n, p, g.n_heads, d)
            if w is not None:
                x = x + self._delta(w)
            if leaf is not None:
                x = x + leaf
            if not g.post_ln:
                ln = hooks.norm_module(self.model, layer, "ln1")
                x = F.layer_norm(x, (d,), ln.weight, ln.bias, ln.eps)
            attn = self.model.blocks[layer].attn
            W = getattr(attn, f"W_{port.upper()}")
            b = getattr(attn, f"b_{port.upper()}")
            return (torch.einsum("nphd,hde->nphe", x, W) + b).to(act.dtype)
        return fn

    def _z(self, layer):
        def fn(act, *, hook):
            cur = hooks.head_output(self.model, layer, act)
            self.cur_heads[layer] = cur
            self._append_sources(cur, self.g.source_slice("head", layer))
            return None
        return fn

    def _attn_out_node(self, layer):
        sl = self.g.source_slice("head", layer)

        def fn(act, *, hook):
            w = self.node_ablate[:, sl].to(act.dtype)
            if not bool((w != 0).any()):
                return act
            cur = self.cur_heads[layer]
            n, p, h, d = cur.shape
            rep = self.rep[:, :, sl].to(act.dtype)
            diff = rep[None] - cur.view(self.K, self.B, p, h, d)
            add = torch.einsum("kbphd,kh->kbpd", diff, w).reshape(n, p, d)
            return act + add
        return fn

    def _mlp_in(self, layer):
        return self._reader_input(("mlp", layer), self.g.reader_slice("mlp", layer).start, (layer, "mlp"),
                                  ("mid", layer), layer, "ln2")

    def _reader_input(self, snapshot_key, reader, leaf_key, stream_key, norm_layer, norm):
        """Hook for a single-reader input (an MLP's, or the read-out's): the stream plus its ablated
        edges' deltas, re-normalised by the block's own (pre-LN) norm."""
        g = self.g

        def fn(act, *, hook):
            self._snapshot(snapshot_key)
            w = self._weights([reader]) if self.D is not None else None
            stream = act if g.post_ln else self.stream[stream_key]
            leaf = self._leaf(leaf_key, stream.shape, stream)
            if w is None and leaf is None:
                return act
            x = stream
            if w is not None:
                x = x + self._delta(w)[:, :, 0]
            if leaf is not None:
                x = x + leaf
            if not g.post_ln:
                ln = hooks.norm_module(self.model, norm_layer, norm)
                x = F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)
            return x.to(act.dtype)
        return fn

    def _mlp_out(self, layer):
        sl = self.g.source_slice("mlp", layer)

        def fn(act, *, hook):
            cur = act
            self._append_sources(cur[:, :, None], sl)
            if self.node_ablate is not None:
                w = self.node_ablate[:, sl.start].to(act.dtype).view(self.K, 1, 1, 1)
                rep = self.rep[None, :, :, sl.start].to(act.dtype)
                c = act.view(self.K, self.B, *act.shape[1:])
                return (c + w * (rep - c)).reshape(act.shape)
            return None
        return fn

    def _frozen_norm(self, layer, norm):
        name_in, name_out = hooks.norm_hook_names(self.model, layer, norm)
        module = hooks.norm_module(self.model, layer, norm)

        def keep_in(act, *, hook):
            self.norm_in[(layer, norm)] = act

        def freeze(act, *, hook):
            if self.scales is None:  # node-level (real) patching: the norm runs as trained
                return None
            sigma = self.scales[(layer, norm)]
            sigma = sigma.repeat(self.K, 1, 1).to(act.dtype)
            x = self.norm_in[(layer, norm)]
            centred = x - x.mean(-1, keepdim=True)
            out = centred / sigma * module.weight + module.bias
            if self.D is not None:
                D = self.D - self.D.mean(-1, keepdim=True)
                self.D = D / sigma[:, :, None] * module.weight
            return out.to(act.dtype)

        return [(name_in, keep_in), (name_out, freeze)]

    def _readout(self):
        return self._reader_input("output", self.g.reader_slice("output").start, "output", "final", None, "ln_final")


def patched_forward(
    model,
    graph: ComponentGraph,
    inputs: Tensor,
    attention_mask: Optional[Tensor] = None,
    *,
    ablate: Optional[Tensor] = None,
    node_ablate: Optional[Tensor] = None,
    replacement: Optional[Tensor] = None,
    norm_scales: Optional[dict] = None,
    reader_grads: bool = False,
    embed_override: Optional[Tensor] = None,
    record_deltas: bool = False,
    n_copies: Optional[int] = None,
) -> PatchedRun:
    """Run ``inputs`` (``B`` examples) as ``K`` copies, copy ``k`` with its own ablated edges.

    Args:
        ablate: ``[K source reader]`` (or ``[K pos source reader]`` for a per-position graph)
            weights, 1 = edge ablated, 0 = kept (fractions interpolate).
        node_ablate: ``[K source]``: real patching of whole components' outputs instead (node level).
        replacement: ``[B or 1, pos, source, d_model]`` values ablated sources carry.
        norm_scales: the clean-run norm scales (post-LN models; see module docstring). Required
            for edge-level work on BERT.
        reader_grads: put a zero leaf on every reader input (gradients = d metric / d input).
        embed_override: ``[K*B pos d_model]`` replaces the embedding (integrated gradients).
        record_deltas: keep each reader group's ``replacement - current`` as seen by it.
    The returned logits are ordered copy-major: row ``k*B + b``.
    """
    B = int(inputs.shape[0])
    if ablate is not None and node_ablate is not None:
        raise CircuitKDError("pass either edge weights (ablate) or node weights (node_ablate), not both")
    if ablate is not None:
        expected = graph.shape if graph.level == "edge" else None
        if expected is None or tuple(ablate.shape[1:]) != tuple(expected):
            raise CircuitKDError(f"ablate must have shape [copies, *{graph.shape}] for this graph, "
                                 f"got {tuple(ablate.shape)}")
    if node_ablate is not None and node_ablate.shape[1:] != (graph.n_sources,):
        raise CircuitKDError(f"node_ablate must have shape [copies, {graph.n_sources}], got {tuple(node_ablate.shape)}")
    K = n_copies or (ablate.shape[0] if ablate is not None else
                     node_ablate.shape[0] if node_ablate is not None else 1)
    if (ablate is not None or node_ablate is not None or record_deltas) and replacement is None:
        raise CircuitKDError("ablating edges needs replacement values (corrupt, mean or zero outputs)")
    if graph.post_ln and node_ablate is None and (ablate is not None or reader_grads or record_deltas) \
            and norm_scales is None:
        raise CircuitKDError("edges on a post-LN model need the clean run's norm scales (norm_scales)")
    if replacement is not None and replacement.shape[2] != graph.n_sources:
        raise CircuitKDError(f"replacement has {replacement.shape[2]} sources, the graph {graph.n_sources}")
    if ablate is not None:
        ablate = ablate.to(inputs.device)
    if node_ablate is not None:
        ablate_nodes = node_ablate.to(inputs.device)
    else:
        ablate_nodes = None
    run = _EdgeForward(
        model, graph, n_copies=K, batch=B, ablate=ablate, node_ablate=ablate_nodes,
        replacement=replacement, norm_scales=norm_scales if node_ablate is None else None,
        reader_grads=reader_grads, embed_override=embed_override, record_deltas=record_deltas,
    )
    big = inputs.repeat(K, *([1] * (inputs.dim() - 1))) if K > 1 else inputs
    big_mask = None
    if attention_mask is not None:
        big_mask = attention_mask.repeat(K, 1) if K > 1 else attention_mask
    with hooks.edit_hooks(model, run.hook_list()):
        logits = engine_forward(model, big, big_mask)
    return PatchedRun(logits, run.leaves, run.deltas)


# ---------------------------------------------------------------------------- native fast path


def native_edge_supported(model, graph: ComponentGraph) -> bool:
    """Whether :class:`NativeEdgeRunner` reproduces :func:`patched_forward` for this model and graph
    (a pre-LN native model with learned positions, an edge-level graph without positions, token inputs)."""
    return (graph.level == "edge" and not graph.per_position and not graph.post_ln
            and native.supported(model))


class NativeEdgeRunner:
    """:func:`patched_forward` with ``ablate`` for one batch, run directly on a native pre-LN
    model's weights, without the bridge's hooks, starting at the first layer any copy ablates an
    edge into (every layer before it is the clean run, whose residual stream is cached).

    At that start layer the stream and every upstream difference are the clean run's, shared by all
    copies, and ``LN(x + sum_s w_s D_s) @ W = ((xc + sum_s w_s Dc_s) @ (gamma W)) / sigma + beta @ W + b``
    (``c``: centred; ``sigma^2 = |xc + sum_s w_s Dc_s|^2 / d + eps``): the projections of ``xc`` and
    each ``Dc_s`` onto every reader and their Gram matrix are computed once per batch, and a copy
    only mixes them. Later layers are computed per copy.

    Equals :func:`patched_forward` (``ablate=..., replacement=...``) to float rounding
    (``tests/circuits/test_methods.py`` compares them to 1e-5).
    """

    def __init__(self, model, graph: ComponentGraph, inputs: Tensor, attention_mask: Optional[Tensor],
                 clean: SourceValues, replacement: Tensor):
        if not native_edge_supported(model, graph):
            raise CircuitKDError("the native edge runner needs a pre-LN native model and an edge-level graph")
        self.g = graph
        self.ex = ex = native.NativeExecutor(model)
        B, P = inputs.shape
        self.B, self.P = B, P
        with torch.no_grad():
            cache = ex.run(inputs, attention_mask, torch.zeros(B, dtype=torch.long, device=inputs.device))
        self.blocked = cache.blocked.view(1, -1, P, P)  # [1, B|1, dest, src]
        self.streams = [t.detach() for t in cache.resid_pre] + [cache.resid_post[-1].detach()]
        d = self.streams[0].shape[-1]
        self.d = d
        rep = replacement.to(clean.outputs.dtype)
        rep = rep.expand(B, *rep.shape[1:]) if rep.shape[0] != B else rep
        self.rep = rep.permute(2, 0, 1, 3).contiguous()  # [S B P d], source-major
        self.D0 = (self.rep - clean.outputs.permute(2, 0, 1, 3)).contiguous()  # clean-run differences
        self.layers = []
        with torch.no_grad():
            self._precompute(model, graph)
        reader_layer = [graph.n_layers if node.kind == "output" else node.layer for node, _ in graph.readers]
        self.reader_layer = torch.tensor(reader_layer)

    def _precompute(self, model, graph: ComponentGraph) -> None:
        ex = self.ex
        for layer in range(graph.n_layers):
            attn = model.blocks[layer].attn
            W = torch.stack([getattr(attn, f"W_{p.upper()}").detach() for p in HEAD_PORTS], 1)  # [H 3 d e]
            b = torch.stack([getattr(attn, f"b_{p.upper()}").detach() for p in HEAD_PORTS], 1)  # [H 3 e]
            gamma, beta, eps = ex.layers[layer]["ln1"]
            S = graph.n_sources_before("head", layer)
            Y = torch.cat([self.streams[layer][None], self.D0[:S]], 0)  # [J B P d]
            Y = (Y - Y.mean(-1, keepdim=True)).flatten(1, 2)  # [J BP d]
            A = (gamma[None, None, :, None] * W).flatten(0, 1)  # [R d e], reader h*3+i
            c = (torch.einsum("d,hide->hie", beta, W) + b).flatten(0, 1)  # [R e]
            J = Y.shape[0]
            self.layers.append(dict(
                W=W, b=b, W_O=hooks.W_O(model, layer).detach(), b_O=hooks.b_O(model, layer).detach(),
                P=torch.einsum("jnd,rde->rjne", Y, A).reshape(A.shape[0], J, -1).contiguous(),  # [R J BPe]
                G=torch.einsum("jnd,lnd->jln", Y, Y).reshape(J * J, -1).contiguous(),  # [JJ BP]
                c=c[:, None, None, :], eps=eps, S=S))

    def start_layer(self, ablate: Tensor) -> int:
        active = ((ablate != 0) & self.g.valid.to(ablate.device)).flatten(0, 1).any(0)
        return int(self.reader_layer[active].min()) if bool(active.any()) else self.g.n_layers

    def _delta(self, ablate: Tensor, Dk: Optional[Tensor], S0: int, readers, s_avail: int,
               D0: Optional[Tensor] = None) -> Tensor:
        """``[K R B*P*d]``: each reader's ``sum_s w[k, s, r] (replacement_s - current_s)`` (readers: slice or index;
        ``D0``: the clean-run differences, ``self.D0`` or their read positions)."""
        D0 = self.D0 if D0 is None else D0
        wT = ablate[:, :s_avail][:, :, readers].to(self.D0.dtype).transpose(1, 2)  # [K R s]
        out = torch.matmul(wT[:, :, :S0], D0[:S0].flatten(1))
        if Dk is not None:
            out = out + torch.matmul(wT[:, :, S0:], Dk)
        return out

    def _shared_qkv(self, ablate: Tensor, layer: int, K: int) -> Tensor:
        """``[R K*B P e]`` reader projections at the start layer (see the class docstring)."""
        g, sh, B, P = self.g, self.layers[layer], self.B, self.P
        w = ablate[:, :sh["S"], g.reader_slice("head", layer)].to(self.D0.dtype)
        U = torch.cat([torch.ones_like(w[:, :1]), w], 1)  # [K J R]: the stream, then each source
        R, J = U.shape[2], U.shape[1]
        Ur = U.permute(2, 0, 1)  # [R K J]
        proj = torch.matmul(Ur, sh["P"]).view(R, K, B * P, -1)
        UU = (Ur[:, :, :, None] * Ur[:, :, None, :]).reshape(R * K, J * J)
        sq = torch.matmul(UU, sh["G"]).view(R, K, B * P, 1)
        sigma = torch.sqrt(sq.clamp_min(0) / self.d + sh["eps"])
        return (proj / sigma).view(R, K * B, P, -1) + sh["c"]

    def _one_reader(self, ablate: Tensor, layer: int, r: int, K: int) -> Tensor:
        """``[K*B P e]``: :meth:`_shared_qkv` for the single reader ``r`` (head-major index within ``layer``)."""
        sh, B, P = self.layers[layer], self.B, self.P
        w = ablate[:, :sh["S"], self.g.reader_slice("head", layer).start + r].to(self.D0.dtype)  # [K S]
        U = torch.cat([torch.ones_like(w[:, :1]), w], 1)  # [K J]
        J = U.shape[1]
        proj = torch.matmul(U, sh["P"][r]).view(K, B * P, -1)
        sq = torch.matmul((U[:, :, None] * U[:, None, :]).reshape(K, J * J), sh["G"]).view(K, B * P, 1)
        sigma = torch.sqrt(sq.clamp_min(0) / self.d + sh["eps"])
        return (proj / sigma).view(K * B, P, -1) + sh["c"][r]

    @torch.no_grad()
    def start_cache(self, ablate: Tensor, layer: int, read_pos: Optional[Tensor] = None) -> dict:
        """The head inputs and outputs at ``layer`` of the ``K`` copies in ``ablate`` (no copy may ablate an
        edge into an earlier layer): ``qkv`` ``[head 3 K*B pos e]`` and ``z`` ``[head K*B*pos' e]``
        (``pos' = 1`` in the last layer with ``read_pos``). :meth:`logits` with ``cache=`` reuses them for
        copies that differ from these only in edges into one reader of ``layer``."""
        if self.start_layer(ablate) < layer:
            raise CircuitKDError("a start cache needs every ablated edge at or after its layer")
        store: dict = {}
        self.logits(ablate, read_pos, start=layer, capture=store)
        return store

    @torch.no_grad()
    def logits(self, ablate: Tensor, read_pos: Optional[Tensor] = None, *, cache: Optional[dict] = None,
               reader: Optional[int] = None, start: Optional[int] = None,
               capture: Optional[dict] = None) -> Tensor:
        """Logits ``[K*B pos vocab]`` (copy-major) for ``ablate`` ``[K source reader]`` (no gradients).

        With ``read_pos`` (``Int[batch]``) only each example's read position is computed in the last
        layer (its query, its attention row, its output; keys and values still at every position)
        and ``[K*B vocab]`` logits there are returned.

        With ``cache`` (:meth:`start_cache` of ``K`` copies at ``cache["layer"]``) and ``reader`` (a graph
        reader index of that layer), copy ``k`` of ``ablate`` must differ from cached copy ``k`` only in edges
        into ``reader``: the run starts at that layer, recomputes that one reader's projection and its head,
        and takes every other head from the cache. The recomputed ``proj`` ``[K*B pos e]`` and the head's ``z`` (``out``)
        are left in ``self.trial`` for :meth:`commit_cache`.
        """
        g, ex = self.g, self.ex
        K, B, P, d, H = ablate.shape[0], self.B, self.P, self.d, g.n_heads
        D0, rep = self.D0, self.rep
        ar = torch.arange(B, device=self.D0.device)

        def at_read(t: Tensor, lead: int) -> Tensor:  # [*lead, B*P*d] or [*lead, B, P, d] -> [*lead, B*d]
            return t.reshape(*t.shape[:lead], B, P, d)[(slice(None),) * lead + (ar, read_pos)].flatten(lead)
        if cache is not None:
            start = cache["layer"]
        L0 = self.start_layer(ablate) if start is None else start
        only = None  # the one head recomputed from a cache
        S0 = g.n_sources_before("head", L0) if L0 < g.n_layers else g.n_sources
        x = self.streams[L0][None].expand(K, B, P, d)
        Dk = None  # [K s B*P*d]: differences of the sources at or after the start layer
        blocked = self.blocked
        if blocked.shape[1] > 1 and K > 1:
            blocked = blocked.repeat(1, K, 1, 1)
        for layer in range(L0, g.n_layers):
            p, wts = ex.layers[layer], self.layers[layer]
            if layer == L0 and cache is not None:
                r = reader - g.reader_slice("head", layer).start
                only, port = divmod(r, 3)
                proj = self._one_reader(ablate, layer, r, K)
                qkv = cache["qkv"][only].clone()
                qkv[port] = proj
                qkv = qkv[None]  # [1 3 K*B P e]
            elif layer == L0:
                qkv = self._shared_qkv(ablate, layer, K).view(H, 3, K * B, P, -1)
            else:
                rs = g.reader_slice("head", layer)
                hit = (ablate[:, :wts["S"], rs] != 0).flatten(0, 1).any(0)  # [R]: readers some copy ablates into

                def project(readers: list[int], xs: Tensor, D0s: Tensor, Dks: Optional[Tensor], n: int) -> Tensor:
                    """``[K len(readers) n e]``: the readers' projections over ``n`` positions per copy; readers no
                    copy ablates an edge into read the stream itself and share one LN(x)."""
                    out = xs.new_empty(K, len(readers), n, wts["W"].shape[-1])
                    W, b = wts["W"].flatten(0, 1), wts["b"].flatten(0, 1)[:, None]  # [R d e], [R 1 e]
                    plain = [j for j, r in enumerate(readers) if not hit[r]]
                    if plain:
                        rr = [readers[j] for j in plain]
                        out[:, plain] = torch.matmul(ex.ln(xs.reshape(K, 1, n, d), p["ln1"]), W[rr]) + b[rr]
                    mixed = [j for j, r in enumerate(readers) if hit[r]]
                    if mixed:
                        rr = [readers[j] for j in mixed]
                        # x + sum_s w_s D_s for every (copy, reader) as one matmul over the stacked stream
                        # and differences [K J n*d] (J = 1 + sources before this layer)
                        wT = ablate[:, :wts["S"], [rs.start + r for r in rr]].to(xs.dtype).transpose(1, 2)
                        U = torch.cat([torch.ones_like(wT[:, :, :1]), wT], 2)  # [K n_mixed J]
                        parts = [xs.reshape(K, 1, n * d), D0s[:S0].reshape(1, S0, n * d).expand(K, -1, -1)]
                        Y = torch.cat(parts + ([Dks] if Dks is not None else []), 1)
                        inp = ex.ln(torch.matmul(U, Y).view(K, -1, n, d), p["ln1"])
                        out[:, mixed] = torch.matmul(inp, W[rr]) + b[rr]
                    return out

                if read_pos is not None and layer == g.n_layers - 1:
                    # last layer: only the read positions' queries reach the output
                    qr = project([3 * h for h in range(H)], at_read(x, 1), at_read(D0, 1),
                                 at_read(Dk, 2) if Dk is not None else None, B)  # [K H B e]
                    kv = project([3 * h + i for h in range(H) for i in (1, 2)], x, D0, Dk, B * P)
                    kv = kv.view(K, H, 2, B * P, -1).permute(1, 2, 0, 3, 4).reshape(H, 2, K * B, P, -1)
                    qkv = (qr.transpose(0, 1).reshape(H, K * B, 1, -1), kv[:, 0], kv[:, 1])
                else:
                    qkv = project(list(range(3 * H)), x, D0, Dk, B * P)
                    qkv = qkv.view(K, H, 3, B * P, -1).permute(1, 2, 0, 3, 4).reshape(H, 3, K * B, P, -1)
            if capture is not None and layer == L0:
                capture.update(layer=layer, qkv=qkv)
            q_read = isinstance(qkv, tuple)  # queries already at the read positions
            q, k, v = qkv if q_read else (qkv[:, 0], qkv[:, 1], qkv[:, 2])  # [H N P e]
            if read_pos is not None and layer == g.n_layers - 1:
                # last layer: from here on only the read positions (P -> 1) reach the output
                if not q_read:
                    q = q.reshape(q.shape[0], K, B, P, -1)[:, :, ar, read_pos].reshape(q.shape[0], K * B, 1, -1)
                rows = self.blocked.expand(1, B, P, P)[0, ar, read_pos][None, :, None]  # [1 B 1 P]
                blocked = rows.repeat(1, K, 1, 1) if K > 1 else rows
                x, D0, rep = at_read(x, 1).view(K, B, 1, d), at_read(D0, 1), at_read(rep, 1)
                Dk = at_read(Dk, 2) if Dk is not None else None
                P = 1
            pattern = masked_softmax(torch.matmul(q, k.transpose(-1, -2)) / ex.scale, blocked)
            z = torch.matmul(pattern, v)  # [H N P e]
            if layer == L0 and only is not None:
                # the cache holds every head's z (a quarter of its output's size); only head `only` changed
                z_new = z.reshape(K * B * P, -1)
                self.trial = {"proj": proj, "out": z_new, "head": only, "port": port}
                z = cache["z"].clone()
                z[only] = z_new
            z = z.reshape(H, K * B * P, -1)
            if capture is not None and layer == L0:
                capture["z"] = z
                return z
            heads = torch.matmul(z, wts["W_O"])  # [H N*P d]
            mid = x + (heads.sum(0) + wts["b_O"]).view(K, B, P, d)
            hs = g.source_slice("head", layer)
            diff = (rep[hs].reshape(H, 1, B * P * d) - heads.view(H, K, B * P * d)).transpose(0, 1)
            Dk = diff if Dk is None else torch.cat([Dk, diff], 1)
            if g.has_mlp:
                mr = g.reader_slice("mlp", layer)
                h = mid + self._delta(ablate, Dk, S0, mr, g.n_sources_before("mlp", layer), D0).view(K, B, P, d)
                h = ex.act(F.linear(ex.ln(h, p["ln2"]), p["fc_in"].weight, p["fc_in"].bias))
                out = F.linear(h, p["fc_out"].weight, p["fc_out"].bias)
                x = mid + out
                ms = g.source_slice("mlp", layer)
                diff = rep[ms].reshape(1, 1, B * P * d) - out.reshape(K, 1, B * P * d)
                Dk = torch.cat([Dk, diff], 1)
            else:
                x = mid
        if read_pos is not None and P > 1:  # nothing ablated inside the blocks: read the final stream
            x, D0, P = at_read(x, 1).view(K, B, 1, d), at_read(D0, 1), 1
        final = x + self._delta(ablate, Dk, S0, g.reader_slice("output"), g.n_sources, D0).view(K, B, P, d)
        if read_pos is not None:
            return ex.logits(final).reshape(K * B, -1)
        return ex.logits(final).reshape(K * B, P, -1)

    def commit_cache(self, cache: dict, picks: list[tuple[int, bool]]) -> dict:
        """The start cache of a new list of copies: copy ``j`` is cached copy ``picks[j][0]``, with the
        last :meth:`logits` call's recomputed reader and head (``self.trial``) where ``picks[j][1]``
        (the cache's tensors are updated in place where the copies keep their order)."""
        B, K = self.B, cache["qkv"].shape[2] // self.B
        order = [k for k, _ in picks]
        if order[:K] == list(range(K)):  # the old copies in place, new ones appended
            extra = torch.tensor(order[K:], dtype=torch.long)
            qkv, heads = cache["qkv"], cache["z"]
            if len(extra):
                qkv = torch.cat([qkv, qkv.unflatten(2, (K, B))[:, :, extra].flatten(2, 3)], 2)
                heads = torch.cat([heads, heads.unflatten(1, (K, -1))[:, extra].flatten(1, 2)], 1)
        else:
            src = torch.tensor(order)
            qkv = cache["qkv"].unflatten(2, (K, B))[:, :, src].flatten(2, 3)
            heads = cache["z"].unflatten(1, (K, -1))[:, src].flatten(1, 2)
        taken = [j for j, (_, t) in enumerate(picks) if t]
        if taken:
            tr = self.trial
            rows = torch.tensor([picks[j][0] for j in taken])
            dst = torch.tensor(taken)
            qkv = qkv.unflatten(2, (len(picks), B))
            qkv[tr["head"], tr["port"], dst] = tr["proj"].unflatten(0, (K, B))[rows]
            qkv = qkv.flatten(2, 3)
            heads = heads.unflatten(1, (len(picks), -1))
            heads[tr["head"], dst] = tr["out"].unflatten(0, (K, -1))[rows]
            heads = heads.flatten(1, 2)
        return {"layer": cache["layer"], "qkv": qkv, "z": heads}
