"""Reader-input gradients of EAP and the integrated-gradient methods without hooks, on native pre-LN models
(EAP, Syed et al. 2023; EAP-IG, Hanna et al. 2024; MIB's variants, Mueller et al. 2025; auto-circuit's
mask-gradient IG, Miller et al. 2024).

Every gradient method needs ``d metric / d (input of reader r)`` for every reader: each head's
query/key/value input and each MLP's input (pre-LN: before the block's norm) and the output's.
The hooked path (:func:`circuitkd.circuits.forward.patched_forward` with ``reader_grads``) gives
every head its own copy of the residual stream, normalises each copy and lets autograd run back
through ``3 * n_heads`` norms per layer. Here one forward runs on the weights (the same pieces as
:class:`circuitkd.native.NativeExecutor`, attention through :func:`circuitkd.native.attend`),
``torch.autograd.grad`` is taken at the tensors that forward exposes (each layer's fused q/k/v
projections, each MLP's input, the final stream), and the step from a projection back to its
reader's input is the LayerNorm's Jacobian in closed form (exact: ``y = gamma * xhat + beta``,
``xhat = (x - mu) / sigma``)::

    d/dx = (1 / sigma) * (g - mean(g) - xhat * mean(g * xhat)),   g = gamma * (dq_h @ W_h^T)

Copies of a batch (integration steps) ride in the batch dimension, and the sum over copies is
taken before the ``[.. head d_model]`` tensors are formed: ``sum_k dq_k / sigma_k`` is projected
once, ``mean(g)`` is a dot product with ``gamma @ W_h / d``, and ``mean(g * xhat) = dq_h . (q_h - b_h
- beta @ W_h) / d``. A copy whose forward is the clean run up to some layer (an interpolated node
group of ``eap-ig-activations``) shares that prefix with the others: it is computed once and
expanded, and autograd sums its gradient over the copies.

Equal to the hooked path to float rounding; ``tests/circuits/test_native_gradients.py`` compares them
for every method, with padding masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from circuitkd import native
from circuitkd.circuits.base import BatchValues
from circuitkd.circuits.graph import ComponentGraph
from circuitkd.circuits.paths import native_allowed
from circuitkd.metrics import Metric, evaluate_metric, read_positions, readout

#: Rows x positions one native forward holds (copies of a batch are chunked to stay under it).
TOKENS_PER_FORWARD = 1 << 15
#: The same for mask gradients, whose contraction streams every source's difference at every token: smaller
#: chunks stay in cache (measured on the peers benchmark's model: 4,096 tokens ran ~1.7x faster than 32,768).
MASK_TOKENS_PER_FORWARD = 1 << 12


def supported(model, graph: ComponentGraph, inputs: Tensor, *, per_position: bool = True) -> bool:
    """Whether the native path reproduces the hooked one: a native pre-LN model (learned positions,
    plain MLP), an edge-level graph and token inputs (``per_position=False`` also refuses per-position graphs)."""

    return (native_allowed() and graph.level == "edge" and not graph.post_ln and not inputs.is_floating_point()
            and (per_position or not graph.per_position) and native.supported(model))


def copies_per_forward(batch: int, pos: int, requested: Optional[int], total: int,
                       budget: Optional[int] = None) -> int:
    """Copies of a ``batch x pos`` batch per forward: ``requested`` if given, else as many as fit in
    ``budget`` tokens (default :data:`TOKENS_PER_FORWARD`; at least one, at most ``total``)."""
    if requested is not None:
        return requested
    budget = TOKENS_PER_FORWARD if budget is None else budget
    return max(1, min(total, budget // max(1, batch * pos)))


@dataclass
class Override:
    """Copies whose node group's output is replaced by the constant ``clean + coef[k] * diff``
    (``eap-ig-activations``): the group is layer ``layer``'s heads (``kind="head"``) or MLP."""

    kind: str
    layer: int
    coef: Float[Tensor, " copies"]
    diff: Float[Tensor, "batch pos d_model"]


class NativeGradients:
    """A native pre-LN model's forward for a batch of ``B`` prompts of ``P`` tokens, run as ``K`` copies,
    with the gradient of a summed metric at every reader's input."""

    def __init__(self, model, graph: ComponentGraph, attention_mask: Optional[Tensor], batch: int, pos: int):
        from circuitkd.native import NativeExecutor

        self.g, self.ex = graph, NativeExecutor(model)
        self.B, self.P = batch, pos
        ex = self.ex
        H, e, d = ex.H, ex.dh, ex.d
        self.blocked = ex.blocked(attention_mask, pos, ex.tok.device)  # [B|1 1 P P]
        self.layers = []
        for p in ex.layers:
            weight = torch.cat([p[t].weight for t in "qkv"], 0)  # [3He d]
            bias = torch.cat([p[t].bias for t in "qkv"], 0)
            gamma, beta, _ = p["ln1"]
            W = weight.detach().view(3, H, e, d).transpose(-1, -2)  # [3 H d e]
            A = gamma.detach()[:, None] * W  # gamma folded in: LN's linear part then the projection
            u = A.sum(2) / d  # [3 H e]
            offset = bias.detach().view(3, H, e) + torch.einsum("d,thde->the", beta.detach(), W)
            eye = torch.eye(3 * H, dtype=u.dtype, device=u.device)
            dots = torch.cat([(t.reshape(3 * H, e, 1) * eye[:, None, :]).reshape(3 * H * e, 3 * H)
                              for t in (u, offset)], 1)  # [3He 2*3H]: block-diagonal u, then offset
            self.layers.append(dict(weight=weight, bias=bias, A=A, u=u, offset=offset, dots=dots))

    # ------------------------------------------------------------------ forward
    def _ln_stats(self, y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """``(xhat, sigma)`` of a LayerNorm input ``[n P d]`` (no gradient: they enter the closed form only)."""
        y = y.detach()
        mu = y.mean(-1, keepdim=True)
        var = (y - mu).pow(2).mean(-1, keepdim=True)
        sigma = torch.sqrt(var + eps)
        return (y - mu) / sigma, sigma

    def _blocked(self, n: int) -> Tensor:
        b = self.blocked
        return b.repeat(n // self.B, 1, 1, 1) if (b.shape[0] > 1 and n != b.shape[0]) else b

    def _attention(self, layer: int, x: Tensor, rows: Optional[Tensor] = None,
                   heads: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``(qkv [n P 3 H e], z, attention output)`` of layer ``layer`` on stream ``x`` ``[n P d]``; with ``rows``
        (``[n]`` positions) only those destinations are attended from (``z`` ``[n 1 H e]``, output ``[n 1 d]``).
        With ``heads`` the output is each head's write ``[n P H d]`` (no ``b_O``) instead of their sum."""
        ex, w = self.ex, self.layers[layer]
        n = x.shape[0]
        qkv = F.linear(ex.ln(x, ex.layers[layer]["ln1"]), w["weight"], w["bias"]).view(n, self.P, 3, ex.H, ex.dh)
        # unbind, not three slices: its backward stacks the three gradients instead of zero-filling and
        # adding three full-size [n P 3 H e] tensors
        (q, k, v), blocked = qkv.unbind(2), self._blocked(n)
        if rows is not None:
            ar = torch.arange(n, device=x.device)
            q = q[ar, rows][:, None]
            blocked = blocked.expand(n, 1, self.P, self.P)[ar, 0, rows][:, None, None]  # [n 1 1 P]
        z, _ = ex.attend(q, k, v, blocked)
        if heads:
            return qkv, z, torch.einsum("nphe,hed->nphd", z, ex.layers[layer]["W_O"])
        return qkv, z, ex.out(layer, z)

    def _mlp(self, layer: int, y: Tensor) -> Tensor:
        ex = self.ex
        p = ex.layers[layer]
        return F.linear(ex.act(F.linear(ex.ln(y, p["ln2"]), p["fc_in"].weight, p["fc_in"].bias)),
                        p["fc_out"].weight, p["fc_out"].bias)

    def run(self, x0: Tensor, K: int, *, override: Optional[Override] = None, read_pos: Optional[Tensor] = None,
            alpha: Optional[Tensor] = None, replacement: Optional[Tensor] = None) -> dict:
        """Forward of ``K`` copies from the embedding ``x0`` (``[K*B P d]``, or ``[B P d]`` shared by all
        copies until an override makes them differ). Returns the logits ``[K*B P vocab]`` and what the
        backward needs.

        ``read_pos`` (``[B]``): the last layer attends from each example's read position only (keys and
        values everywhere) and the logits are ``[K*B vocab]`` there; nothing else reaches the output.
        ``alpha`` (``[K]``) with ``replacement`` (``[B|1 P source d]``): every reader reads the stream plus
        ``alpha[k] * sum_s (replacement_s - current_s)`` over its upstream sources (every edge mask at
        ``alpha[k]``); the per-source differences are kept (``rec["D"]``, ``[K*B P source d]``).
        """
        g, ex, B, L = self.g, self.ex, self.B, self.g.n_layers
        rec: dict = {"qkv": [], "stats": [], "mlp_in": [], "D": []}
        x = x0
        a = None
        if alpha is not None:
            a = alpha.to(x.dtype).repeat_interleave(B).view(-1, 1, 1)  # [K*B 1 1]
            rep = replacement.to(x.dtype)
            rec["D"].append((rep[:, :, 0] - x.view(K, B, self.P, -1)).view(K * B, self.P, 1, -1))
            dsum = rec["D"][0][:, :, 0]  # sum of the differences of the sources so far
        diff = None if override is None else override.diff
        coef = None if override is None else override.coef.view(K, 1, 1, 1).to(x.dtype)
        for layer in range(L):
            p = ex.layers[layer]
            rows = None
            if read_pos is not None and layer == L - 1:
                rows = read_pos.repeat(x.shape[0] // B)
                at_read = lambda t: t[torch.arange(t.shape[0], device=t.device), rows][:, None]  # noqa: E731
                diff = None if diff is None else diff[torch.arange(B, device=diff.device), read_pos][:, None]
            y = x if a is None else x + a * dsum
            if override is not None and override.kind == "head" and override.layer == layer:
                # the group's output is a constant here: its readers get no gradient, so no graph is built
                with torch.no_grad():
                    _, _, attn = self._attention(layer, x, rows)
                x = x if rows is None else at_read(x)
                x = (x[None] + attn[None] + coef * diff[None].to(x.dtype)).reshape(K * B, x.shape[1], -1)
                rec["qkv"].append(None)
                rec["stats"].append(None)
            else:
                rec["stats"].append(self._ln_stats(y, p["ln1"][2]))
                qkv, z, attn = self._attention(layer, y, rows, heads=a is not None)
                rec["qkv"].append(qkv)
                if a is not None:  # attn holds each head's output [n P H d]: their differences are sources
                    hs = g.source_slice("head", layer)
                    rec["D"].append(rep[:, :, hs][None].sub(attn.view(K, B, self.P, ex.H, -1)).flatten(0, 1))
                    dsum = dsum + rec["D"][-1].sum(2)
                    attn = attn.sum(2) + ex.layers[layer]["o"].bias
                x = (x if rows is None else at_read(x)) + attn
            if g.has_mlp:
                if override is not None and override.kind == "mlp" and override.layer == layer:
                    with torch.no_grad():
                        out = self._mlp(layer, x)
                    x = (x[None] + out[None] + coef * diff[None].to(x.dtype)).reshape(K * B, x.shape[1], -1)
                    rec["mlp_in"].append(None)
                else:
                    # a distinct tensor, so its gradient is the MLP reader's alone (not the stream's)
                    y = x.view_as(x) if a is None else x + a * dsum
                    rec["mlp_in"].append(y)
                    out = self._mlp(layer, y)
                    if a is not None:
                        ms = g.source_slice("mlp", layer)
                        rec["D"].append((rep[:, :, ms][None] - out.view(K, B, self.P, 1, -1)).flatten(0, 1))
                        dsum = dsum + rec["D"][-1][:, :, 0]
                    x = x + out
        final = x if a is None else x + a * dsum
        if final.shape[0] != K * B:  # no override reached: every copy is the same run
            final = final[None].expand(K, *final.shape).reshape(K * B, *final.shape[1:])
        rec["final"] = final
        logits = ex.logits(final)
        rec["logits"] = logits if read_pos is None else logits[:, 0]
        return rec

    # ------------------------------------------------------------------ backward
    def _port_gradients(self, layer: int, qkv: Tensor, dqkv: Tensor, stats) -> Tensor:
        """``[B P 3 H d]``: d metric / d (each q/k/v reader's input), summed over the copies in the rows."""
        w, B, P = self.layers[layer], self.B, self.P
        xhat, sigma = stats
        n = qkv.shape[0]
        K = n // B
        d = xhat.shape[-1]
        inv = 1.0 / sigma  # [n P 1]
        T, e = dqkv.shape[2] * dqkv.shape[3], dqkv.shape[4]
        flat = dqkv.reshape(n * P, T, e)
        invf = inv.reshape(n * P, 1)
        # the per-reader dot products with u and offset as one GEMM on a block-diagonal [T*e 2T] matrix, and
        # the one with qkv itself, so the [n P 3 H e] gradient is read a few times and never rescaled in full
        dots = torch.matmul(flat.reshape(n * P, T * e), w["dots"])  # [nP 2T]
        m1 = (dots[:, :T] * invf).view(n, P, 3, -1)  # mean over d of gamma*(dq W^T)
        m2 = (((flat * qkv.detach().reshape(n * P, T, e)).sum(-1) - dots[:, T:]) * invf / d).view(n, P, 3, -1)
        if K > 1:  # mean over d of gamma*(dq W^T)*xhat above; the sum over copies of dq / sigma here
            s1 = (flat.view(K, B * P, T * e) * invf.view(K, B * P, 1)).sum(0)
        else:
            s1 = flat.reshape(B * P, T * e) * invf
        out = torch.einsum("nthe,thde->nthd", s1.view(B * P, 3, -1, e), w["A"])
        if K > 1:
            m1s = m1.reshape(K, B * P, -1).sum(0)
            m3 = torch.bmm(m2.reshape(K, B * P, -1).transpose(0, 1).transpose(1, 2),
                           xhat.reshape(K, B * P, d).transpose(0, 1))  # [BP 3H d]
        else:
            m1s = m1.reshape(B * P, -1)
            m3 = m2.reshape(B * P, -1, 1) * xhat.reshape(B * P, 1, d)
        out = out.reshape(B * P, -1, d) - m1s[..., None] - m3
        return out.view(B, P, 3, -1, d)

    def summed_gradients(self, rec: dict, value: Tensor, K: int, read_pos: Optional[Tensor] = None) -> dict:
        """``d value / d (reader input)`` summed over the ``K`` copies, keyed like
        :func:`~circuitkd.circuits.forward.patched_forward`'s leaves: ``(layer, "q"|"k"|"v")``
        ``[B P head d_model]``, ``(layer, "mlp")`` and ``"output"`` ``[B P d_model]``."""
        targets = [t for t in rec["qkv"] + rec["mlp_in"] if t is not None] + [rec["final"]]
        grads = iter(torch.autograd.grad(value, targets))
        B, P, d, H = self.B, self.P, self.ex.d, self.ex.H
        out: dict = {}
        for layer, (qkv, stats) in enumerate(zip(rec["qkv"], rec["stats"])):
            if qkv is None:
                g = torch.zeros(B, P, 3, H, d, dtype=rec["final"].dtype, device=rec["final"].device)
            else:
                g = self._port_gradients(layer, qkv, next(grads), stats)
            for i, port in enumerate("qkv"):
                out[(layer, port)] = g[:, :, i]
        for layer, y in enumerate(rec["mlp_in"]):
            out[(layer, "mlp")] = (torch.zeros(B, P, d, dtype=rec["final"].dtype, device=rec["final"].device) if y is None else
                                   self._place(_sum_copies(next(grads), B), read_pos))
        out["output"] = self._place(_sum_copies(next(grads), B), read_pos)
        return out

    def _place(self, t: Tensor, read_pos: Optional[Tensor]) -> Tensor:
        """``[B P d]`` from a gradient computed at the read positions only (``[B 1 d]``; zero elsewhere)."""
        if t.shape[1] == self.P:
            return t
        full = t.new_zeros(self.B, self.P, t.shape[-1])
        full[torch.arange(self.B, device=t.device), read_pos] = t[:, 0]
        return full


def _sum_copies(t: Tensor, B: int) -> Tensor:
    return t.view(-1, B, *t.shape[1:]).sum(0)


def _metric_sum(metric: Metric, logits: Tensor, bv: BatchValues, K: int, read_pos: Optional[Tensor] = None) -> Tensor:
    clean = bv.clean.logits if read_pos is None else readout(bv.clean.logits, read_pos)
    return evaluate_metric(metric, logits, bv.pairs.repeat(K), clean).sum()


def reader_gradients(model, graph: ComponentGraph, bv: BatchValues, metric: Metric, inputs: Tensor, *,
                     n_copies: int = 1, embed: Optional[Tensor] = None, override: Optional[Override] = None) -> dict:
    """``d sum(metric) / d (reader input)`` summed over ``n_copies`` copies of ``inputs`` (tokens ``[B P]``),
    keyed like :func:`circuitkd.circuits.gradients.summed_reader_gradients` (which it equals on these models).

    ``embed`` (``[copies*B P d_model]``) replaces the embedding (input interpolation); ``override`` replaces
    a node group's output in every copy (``eap-ig-activations``; the copies share the clean prefix).
    """
    B, P = inputs.shape
    run = NativeGradients(model, graph, bv.pairs.attention_mask, B, P)
    with torch.enable_grad():
        if embed is None:
            x0 = run.ex.tok[inputs] + run.ex.pos[:P][None]
            if override is None and n_copies > 1:
                x0 = x0.repeat(n_copies, 1, 1)
        else:
            x0 = embed
        read_pos = read_positions(bv.pairs, P, inputs.device)
        rec = run.run(x0, n_copies, override=override, read_pos=read_pos)
        value = _metric_sum(metric, rec["logits"], bv, n_copies, read_pos)
        return run.summed_gradients(rec, value, n_copies, read_pos)


def mask_gradients(model, graph: ComponentGraph, bv: BatchValues, metric: Metric,
                   alphas: Float[Tensor, " copies"]) -> Float[Tensor, "source reader"]:
    """``sum_copies sum_batch d metric / d w[source, reader]`` with every edge mask of copy ``k`` at
    ``alphas[k]`` (auto-circuit's mask gradient): ``d metric / d w[s, r] = (replacement_s - current_s) .
    g_r`` where ``g_r`` is the gradient at reader ``r``'s input; float64, zero off the graph's edges."""
    g = graph
    B, P = bv.pairs.clean.shape
    K = len(alphas)
    run = NativeGradients(model, g, bv.pairs.attention_mask, B, P)
    total = torch.zeros(g.n_sources, g.n_readers, dtype=torch.float64)
    with torch.enable_grad():
        x0 = (run.ex.tok[bv.pairs.clean] + run.ex.pos[:P][None]).repeat(K, 1, 1)
        rec = run.run(x0, K, alpha=alphas, replacement=bv.replacement)
        value = _metric_sum(metric, rec["logits"], bv, K)
        targets = [t for t in rec["qkv"] + rec["mlp_in"]] + [rec["final"]]
        grads = torch.autograd.grad(value, targets)
    with torch.no_grad():
        D = torch.cat(rec["D"], 2).detach().flatten(0, 1)  # [K*B*P source d]
        n, S_all, d = D.shape
        Dp = D.permute(1, 0, 2).reshape(S_all, n * d)  # source-major: a layer's upstream sources are its first rows
        Dsum = Dp.view(S_all, n, d).sum(-1)  # [source n]
        for layer in range(g.n_layers):
            S = g.n_sources_before("head", layer)
            total[:S, g.reader_slice("head", layer)] += _mask_port_scores(
                run, layer, Dp[:S], Dsum[:S], rec["qkv"][layer], grads[layer], rec["stats"][layer]).double()
            if g.has_mlp:
                S = g.n_sources_before("mlp", layer)
                gm = grads[g.n_layers + layer].reshape(n * d)
                total[:S, g.reader_slice("mlp", layer)] += (Dp[:S] @ gm).double()[:, None]
        total[:, g.reader_slice("output")] += (Dp @ grads[-1].reshape(n * d)).double()[:, None]
    return total


def _mask_port_scores(run: NativeGradients, layer: int, Dp: Tensor, Dsum: Tensor, qkv: Tensor, dqkv: Tensor,
                      stats) -> Tensor:
    """``[S 3H]`` (readers head-major, q/k/v inner): ``sum_rows D_s . g_r`` over the q/k/v readers ``r`` of
    ``layer``, ``g_r`` their input gradients, never formed: with ``g_r = (gamma * (dq_r W_r^T) - m1_r - xhat
    m2_r) / sigma`` the sum splits into ``D_s . (gamma * dq_r W_r^T / sigma)`` (one matmul over rows and
    ``d_model``), ``m1_r / sigma * sum_d D_s`` and ``m2_r / sigma * (D_s . xhat)``.
    ``Dp``: ``[S rows*d]`` the sources' differences, ``Dsum``: ``[S rows]`` their sums over ``d_model``."""
    w = run.layers[layer]
    xhat, sigma = stats
    S = Dp.shape[0]
    d = xhat.shape[-1]
    n = Dp.shape[1] // d
    xhat, inv = xhat.reshape(n, d), 1.0 / sigma.reshape(n, 1)
    dq = dqkv.reshape(n, 3, -1, dqkv.shape[-1]) * inv[:, :, None, None]  # [n 3 H e], over sigma
    H, e = dq.shape[2], dq.shape[3]
    m1 = torch.einsum("nthe,the->nth", dq, w["u"]).reshape(n, 3 * H)
    m2 = ((dq * (qkv.detach().reshape(n, 3, H, e) - w["offset"])).sum(-1) / d).reshape(n, 3 * H)
    F_ = torch.bmm(dq.permute(1, 2, 0, 3).reshape(3 * H, n, e), w["A"].reshape(3 * H, d, e).transpose(1, 2))  # [3H n d]
    out = Dp @ F_.reshape(3 * H, n * d).T  # [S 3H]
    out -= Dsum @ m1
    out -= (Dp.view(S, n, d) * xhat).sum(-1) @ m2
    return out.view(S, 3, H).transpose(1, 2).reshape(S, 3 * H)
