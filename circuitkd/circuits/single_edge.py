"""Exact edge patching on a native pre-LN model, every edge of a batch at once, recomputing only
what one ablated edge changes (the intervention of Wang et al. 2022 / Conmy et al. 2023).

With one edge ``src -> dst<port>`` ablated and everything else clean, the run equals the clean run
up to ``dst``'s layer; there only ``dst``'s input changes:

- a head's ``q``/``k``/``v`` input becomes ``LN1(resid_pre + D_src)`` (``D_src = replacement_src -
  clean_src``), so only that head's projection for that port is recomputed, the other two come
  from the clean cache, and only that head's output moves the residual stream;
- an MLP's input becomes ``LN2(resid_mid + D_src)``: that MLP's output changes;
- the read-out's input becomes ``resid_final + D_src``.

From the next layer on every position is recomputed for each ablated copy, and in the last layer
only each example's read position (``circuitkd.patching``'s native executor and its
``_after_mid``/``_finish`` propagation, shared with activation patching's fast path). Edges are
grouped by the layer they enter and chunked over copies, so a forward never starts earlier than
the edge needs. Checked against the hooked one-edge-per-forward path in
``tests/circuits/test_methods.py`` (to 1e-5).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from circuitkd import native
from circuitkd.circuits.graph import HEAD_PORTS, ComponentGraph


class SingleEdgeRunner:
    """Read-out logits of one batch with each of many edges ablated alone (see the module docstring).

    ``inputs`` ``[batch pos]`` tokens, ``clean_outputs`` ``[batch pos source d_model]`` (the clean
    run's source outputs), ``replacement`` the same shape or ``[1 pos source d_model]``.
    """

    def __init__(self, model, graph: ComponentGraph, inputs: Tensor, attention_mask, clean_outputs: Tensor,
                 replacement: Tensor, read_pos: Tensor):
        self.g = graph
        self.ex = ex = native.NativeExecutor(model)
        with torch.no_grad():
            self.cache = ex.run(inputs, attention_mask, read_pos)
        B, P = inputs.shape
        self.B, self.P = B, P
        self.ar = torch.arange(B, device=inputs.device)
        rep = replacement.to(clean_outputs.dtype).expand(B, *replacement.shape[1:])
        self.D = (rep - clean_outputs).permute(2, 0, 1, 3).contiguous()  # [S B P d]
        # per layer: q/k/v weights [3 H dh d] and biases [3 H dh]
        self.W = [torch.stack([p[n].weight.detach().view(ex.H, ex.dh, ex.d) for n in HEAD_PORTS]) for p in ex.layers]
        self.b = [torch.stack([p[n].bias.detach().view(ex.H, ex.dh) for n in HEAD_PORTS]) for p in ex.layers]

    @property
    def clean_logits(self) -> Tensor:
        """``[batch d_out]``: the clean run read at each example's read position."""
        return self.cache.logits

    def reader_layer(self, reader: int) -> int:
        node, _ = self.g.readers[reader]
        return self.g.n_layers if node.kind == "output" else int(node.layer)

    def groups(self, cells: Tensor, chunk: int) -> Iterator[Tensor]:
        """``cells`` (flat ``source * n_readers + reader`` indices) grouped by reader layer and kind, chunked."""
        R = self.g.n_readers
        key = torch.tensor([self.reader_layer(int(c) % R) * 2 + (self.g.readers[int(c) % R][0].kind == "mlp")
                            for c in cells])
        for k in key.unique().tolist():
            sel = cells[key == k]
            for start in range(0, len(sel), chunk):
                yield sel[start:start + chunk]

    @torch.no_grad()
    def logits(self, cells: Tensor) -> Tensor:
        """``[K batch d_out]`` read-out logits, copy ``k`` with edge ``cells[k]`` ablated alone.

        All ``cells`` must enter readers of one layer and kind (see :meth:`groups`).
        """
        g, ex, c, ar = self.g, self.ex, self.cache, self.ar
        src = (cells // g.n_readers).to(self.D.device)
        rdr = (cells % g.n_readers).tolist()
        node, _ = g.readers[rdr[0]]
        D = self.D[src]  # [K B P d]
        last = ex.L - 1
        if node.kind == "output":
            x = c.resid_post[-1][ar, c.read_pos][None] + D[:, ar, c.read_pos]
            return ex.logits(x)
        layer = int(node.layer)
        p = ex.layers[layer]
        if node.kind == "mlp":
            mid = c.resid_mid[layer][None]  # the stream is clean; only the MLP's input moves
            h = ex.act(F.linear(ex.ln(c.resid_mid[layer][None] + D, p["ln2"]), p["fc_in"].weight, p["fc_in"].bias))
            post = mid + F.linear(h, p["fc_out"].weight, p["fc_out"].bias)
            if layer == last:
                return ex.logits(post[:, ar, c.read_pos])
            return native.finish(ex, c, layer + 1, ("dense", post))
        heads = torch.tensor([g.readers[r][0].head for r in rdr], device=D.device)
        ports = torch.tensor([HEAD_PORTS.index(g.readers[r][1]) for r in rdr], device=D.device)
        x = ex.ln(c.resid_pre[layer][None] + D, p["ln1"])  # [K B P d]
        new = torch.einsum("kbpd,ked->kbpe", x, self.W[layer][ports, heads]) + self.b[layer][ports, heads][:, None, None]
        qkv = [t.permute(2, 0, 1, 3)[heads] for t in (c.q[layer], c.k[layer], c.v[layer])]  # [K B P dh] each
        q, k, v = (torch.where((ports == i).view(-1, 1, 1, 1), new, qkv[i]) for i in range(3))
        blocked = c.blocked  # [B|1 1 P P]
        z_old = c.z[layer].permute(2, 0, 1, 3)[heads]  # [K B P dh]
        W_O = p["W_O"].detach()[heads]  # [K dh d]
        if layer == last:  # only the read positions reach the output
            q_r = q[:, ar, c.read_pos][:, :, None]  # [K B 1 dh]
            blocked_r = blocked.expand(self.B, -1, -1, -1)[ar, 0, c.read_pos][:, None]  # [B 1 P]
            pattern = native.masked_softmax(torch.matmul(q_r, k.transpose(-1, -2)) / ex.scale, blocked_r)
            z = torch.matmul(pattern, v)[:, :, 0]  # [K B dh]
            delta = torch.einsum("kbe,ked->kbd", z - z_old[:, ar, c.read_pos], W_O)
            mid = c.resid_mid[layer][ar, c.read_pos][None] + delta
            return ex.logits(ex.mlp(layer, mid))
        pattern = native.masked_softmax(torch.matmul(q, k.transpose(-1, -2)) / ex.scale, blocked[:, 0][None])
        z = torch.matmul(pattern, v)  # [K B P dh]
        mid = c.resid_mid[layer][None] + torch.einsum("kbpe,ked->kbpd", z - z_old, W_O)
        return native.finish(ex, c, layer + 1, native.after_mid(ex, c, layer, ("dense", mid)))
