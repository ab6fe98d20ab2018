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
from circuitkd.engine import forward as engine_forward
from circuitkd.errors import CircuitKDError
from circuitkd.hooks import Site


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
    """One plain forward recording every source's output (and post-LN norm scales)."""
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
        g = self.g
        readers = [g.reader_slice("mlp", layer).start]

        def fn(act, *, hook):
            self._snapshot(("mlp", layer))
            w = self._weights(readers) if self.D is not None else None
            stream = act if g.post_ln else self.stream[("mid", layer)]
            leaf = self._leaf((layer, "mlp"), stream.shape, stream)
            if w is None and leaf is None:
                return act
            x = stream
            if w is not None:
                x = x + self._delta(w)[:, :, 0]
            if leaf is not None:
                x = x + leaf
            if not g.post_ln:
                ln = hooks.norm_module(self.model, layer, "ln2")
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
        g = self.g
        readers = [g.reader_slice("output").start]

        def fn(act, *, hook):
            self._snapshot("output")
            w = self._weights(readers) if self.D is not None else None
            stream = act if g.post_ln else self.stream["final"]
            leaf = self._leaf("output", stream.shape, stream)
            if w is None and leaf is None:
                return act
            x = stream
            if w is not None:
                x = x + self._delta(w)[:, :, 0]
            if leaf is not None:
                x = x + leaf
            if not g.post_ln:
                ln = hooks.norm_module(self.model, None, "ln_final")
                x = F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)
            return x.to(act.dtype)
        return fn


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
