"""A 2-layer attention-only causal model whose induction mechanism is known by construction.

Head 0.0 is a previous-token head: its query and key read the positional embedding, and
it copies the previous token into a "previous token" subspace. Head 1.0 is an induction
head: its query reads the current token, its *key* reads head 0.0's output (the key
position's previous token), and it copies the attended token into the unembedding's
subspace. Heads 0.1 and 1.1 are zero. All residual codes are orthonormal and zero-mean,
so each LayerNorm only rescales.

On pairs whose clean input repeats a random sequence and whose corrupt input changes
the first half, the mechanism is four edges: embed->0.0<v>, 0.0->1.0<k>, embed->1.0<v>,
1.0->output.
"""
from __future__ import annotations

import torch

from circuitkd.config import ModelSpec
from circuitkd.models.build import build_model
from circuitkd.types import Edge, Node, PromptPairs

V, HALF, D, H = 8, 8, 48, 2
N_CTX = 2 * HALF
D_HEAD = D // H

MECHANISM = {
    Edge(Node("embed"), Node("head", 0, 0), "v"),
    Edge(Node("head", 0, 0), Node("head", 1, 0), "k"),
    Edge(Node("embed"), Node("head", 1, 0), "v"),
    Edge(Node("head", 1, 0), Node("output"), "in"),
}


def _zero_mean_basis(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g)
    a[:, 0] = 1.0  # first direction: all-ones, dropped below, so the rest are zero-mean
    q, _ = torch.linalg.qr(a)
    return q[:, 1:n + 1].T.contiguous()  # [n, d]


def induction_model():
    spec = ModelSpec(backbone="native", causal=True, attn_only=True, n_layers=2, n_heads=H, d_model=D,
                     d_vocab=V, n_ctx=N_CTX, seed=0)
    model = build_model(spec, device="cpu")
    basis = _zero_mean_basis(3 * V + N_CTX, D)
    tok, pos = basis[:V], basis[V:V + N_CTX]
    prev, out = basis[V + N_CTX:2 * V + N_CTX], basis[2 * V + N_CTX:]
    e = torch.eye(D_HEAD)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed._original_component.weight.copy_(tok)
        model.pos_embed._original_component.weight.copy_(pos)
        for layer in range(2):
            ln = model.blocks[layer].ln1._original_component
            ln.weight.fill_(1.0)
        model.ln_final._original_component.weight.fill_(1.0)

        def set_head(layer, W_Q, W_K, W_V, W_O):
            attn = model.blocks[layer].attn
            rows = slice(0, D_HEAD)  # head 0
            attn.q._original_component.weight[rows] = W_Q.T
            attn.k._original_component.weight[rows] = W_K.T
            attn.v._original_component.weight[rows] = W_V.T
            attn.o._original_component.weight[:, rows] = W_O.T

        c0 = (D / 2) ** 0.5  # LayerNorm gain at layer 0 (two unit codes in the residual)
        c1 = (D / 3) ** 0.5
        # previous-token head: query at position i matches key at position i-1
        WQ0 = 3.0 * pos.T @ e[:N_CTX]
        WK0 = 3.0 * torch.cat([pos[:-1], torch.zeros(1, D)]).T @ e[1:N_CTX + 1] if N_CTX < D_HEAD else None
        WK0 = 3.0 * pos[:N_CTX - 1].T @ e[1:N_CTX]
        WV0 = tok.T @ e[:V]
        WO0 = e[:V].T @ prev / c0
        set_head(0, WQ0, WK0, WV0, WO0)
        # induction head: query = current token, key = previous token written by 0.0
        WQ1 = 2.5 * tok.T @ e[:V]
        WK1 = 2.5 * prev.T @ e[:V] / (1 / c0) / c0
        WV1 = tok.T @ e[:V]
        WO1 = 3.0 * e[:V].T @ out / c1
        set_head(1, WQ1, WK1, WV1, WO1)
        model.unembed._original_component.weight.copy_(out)
    return model


def induction_pairs(n: int = 16, seed: int = 0) -> PromptPairs:
    """Clean: a random sequence of distinct tokens, repeated. Corrupt: a different first half."""
    g = torch.Generator().manual_seed(seed)
    first = torch.stack([torch.randperm(V, generator=g)[:HALF] for _ in range(n)])
    other = torch.stack([torch.randperm(V, generator=g)[:HALF] for _ in range(n)])
    clean = torch.cat([first, first], 1)
    corrupt = torch.cat([other, first], 1)
    read = N_CTX - 2  # the second-to-last token: next token is first[:, -1]
    clean_answer = first[:, -1]
    corrupt_answer = other[:, -1]
    keep = clean_answer != corrupt_answer
    return PromptPairs(clean=clean[keep], corrupt=corrupt[keep], clean_answer=clean_answer[keep],
                       corrupt_answer=corrupt_answer[keep], position=read)
