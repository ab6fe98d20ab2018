"""Models whose circuit is known, to check that circuit-discovery methods recover it: the two-layer
attention-only induction mechanism (Elhage et al. 2021; Olsson et al. 2022), a previous-token head in
layer 0 whose output feeds the *key* of an induction head in layer 1 (K-composition).

Two sources of such models:

- :func:`hand_induction_model`: weights set by hand, so the mechanism is known by construction;
- :func:`train_induction_model`: a model trained on repeated random segments of random length at
  random offsets (so no positional shortcut solves it); its previous-token and induction heads are
  found from attention patterns alone (:func:`induction_roles`), never from a circuit method.

On :func:`induction_pairs` (clean: a random segment of distinct tokens, repeated; corrupt: another
first half; read at the second-to-last position, whose next token is the segment's last one) the
mechanism is four edges (:func:`induction_mechanism`): ``embed -> PT<v>`` (the previous token's
identity), ``PT -> IND<k>`` (the key composition), ``embed -> IND<v>`` (the token to copy) and
``IND -> output``. The query of the induction head reads the current token, which clean and corrupt
share at the read position, so that edge carries no difference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from circuitkd.circuits.graph import Circuit
from circuitkd.config import ModelSpec
from circuitkd.errors import CircuitKDError
from circuitkd.models.build import build_model
from circuitkd.types import Edge, Node, PromptPairs

#: sizes of the hand-set model
HAND_VOCAB, HAND_HALF, HAND_D_MODEL, HAND_HEADS = 8, 8, 48, 2


def induction_mechanism(prev_head: int, induction_head: int) -> dict[str, Edge]:
    """The mechanism's four edges for previous-token head ``0.prev_head`` and induction head ``1.induction_head``."""
    pt, ind = Node("head", 0, prev_head), Node("head", 1, induction_head)
    return {
        "embed -> PT<v>": Edge(Node("embed"), pt, "v"),
        "PT -> IND<k>": Edge(pt, ind, "k"),
        "embed -> IND<v>": Edge(Node("embed"), ind, "v"),
        "IND -> output": Edge(ind, Node("output"), "in"),
    }


def _zero_mean_basis(n: int, d: int, seed: int = 0) -> Tensor:
    """``[n d]`` orthonormal rows orthogonal to the all-ones direction (so a LayerNorm only rescales them)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g)
    a[:, 0] = 1.0
    q, _ = torch.linalg.qr(a)
    return q[:, 1:n + 1].T.contiguous()


def hand_induction_model(device: str = "cpu"):
    """A 2-layer attention-only causal native bridge (d_model 48, 2 heads, 8 tokens, 16 positions) whose
    head 0.0 is a previous-token head and head 1.0 an induction head reading 0.0's output in its key;
    heads 0.1 and 1.1 are zero. Token, position, previous-token and output codes are orthonormal and
    zero-mean, so each LayerNorm only rescales."""
    V, half, D, H = HAND_VOCAB, HAND_HALF, HAND_D_MODEL, HAND_HEADS
    n_ctx, d_head = 2 * half, D // H
    spec = ModelSpec(backbone="native", causal=True, attn_only=True, n_layers=2, n_heads=H, d_model=D,
                     d_vocab=V, n_ctx=n_ctx, seed=0)
    model = build_model(spec, device=device)
    basis = _zero_mean_basis(3 * V + n_ctx, D).to(device)
    tok, pos = basis[:V], basis[V:V + n_ctx]
    prev, out = basis[V + n_ctx:2 * V + n_ctx], basis[2 * V + n_ctx:]
    e = torch.eye(d_head, device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed._original_component.weight.copy_(tok)
        model.pos_embed._original_component.weight.copy_(pos)
        for layer in range(2):
            model.blocks[layer].ln1._original_component.weight.fill_(1.0)
        model.ln_final._original_component.weight.fill_(1.0)

        def set_head(layer, W_Q, W_K, W_V, W_O):
            attn = model.blocks[layer].attn
            rows = slice(0, d_head)  # head 0
            attn.q._original_component.weight[rows] = W_Q.T
            attn.k._original_component.weight[rows] = W_K.T
            attn.v._original_component.weight[rows] = W_V.T
            attn.o._original_component.weight[:, rows] = W_O.T

        c0 = (D / 2) ** 0.5  # LayerNorm gain at layer 0 (two unit codes in the residual)
        c1 = (D / 3) ** 0.5
        # previous-token head: the query at position i matches the key at position i-1
        set_head(0, 3.0 * pos.T @ e[:n_ctx], 3.0 * pos[:n_ctx - 1].T @ e[1:n_ctx], tok.T @ e[:V], e[:V].T @ prev / c0)
        # induction head: query = current token, key = the previous token 0.0 wrote
        set_head(1, 2.5 * tok.T @ e[:V], 2.5 * prev.T @ e[:V], tok.T @ e[:V], 3.0 * e[:V].T @ out / c1)
        model.unembed._original_component.weight.copy_(out)
    return model


HAND_MECHANISM = set(induction_mechanism(0, 0).values())


def induction_pairs(n: int = 16, seed: int = 0, *, vocab: int = HAND_VOCAB, half: int = HAND_HALF) -> PromptPairs:
    """Clean: ``half`` distinct random tokens, repeated. Corrupt: another first half, the same second half.
    Read at position ``2 * half - 2``, whose next token is the segment's last (pairs whose two answers
    coincide are dropped)."""
    if vocab < half:
        raise CircuitKDError(f"a segment of {half} distinct tokens needs vocab >= {half}, got {vocab}")
    g = torch.Generator().manual_seed(seed)
    first = torch.stack([torch.randperm(vocab, generator=g)[:half] for _ in range(n)])
    other = torch.stack([torch.randperm(vocab, generator=g)[:half] for _ in range(n)])
    clean, corrupt = torch.cat([first, first], 1), torch.cat([other, first], 1)
    keep = first[:, -1] != other[:, -1]
    return PromptPairs(clean=clean[keep], corrupt=corrupt[keep], clean_answer=first[keep, -1],
                       corrupt_answer=other[keep, -1], position=2 * half - 2)


def repeated_segments(g: torch.Generator, n: int, *, vocab: int, n_ctx: int, min_len: int = 2,
                      max_len: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Training batch: random tokens with one segment of distinct tokens, of random length, at a random
    offset, repeated right after itself. Returns ``tokens [n n_ctx]`` and ``weights [n n_ctx-1]`` (1 where
    the next token is predictable: inside the repeat)."""
    max_len = max_len or n_ctx // 2
    x = torch.randint(0, vocab, (n, n_ctx), generator=g)
    w = torch.zeros(n, n_ctx - 1)
    for b in range(n):
        S = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        r = int(torch.randint(0, n_ctx - 2 * S + 1, (1,), generator=g))
        seg = torch.randperm(vocab, generator=g)[:S]
        x[b, r:r + S] = seg
        x[b, r + S:r + 2 * S] = seg
        w[b, r + S:r + 2 * S - 1] = 1.0
    return x, w


def train_induction_model(*, seed: int = 0, n_heads: int = 4, d_model: int = 32, vocab: int = 24, n_ctx: int = 20,
                          steps: int = 800, batch_size: int = 64, lr: float = 3e-3, min_len: int = 2,
                          device: str = "cpu"):
    """A 2-layer attention-only causal native bridge trained (AdamW) to continue repeated segments
    (:func:`repeated_segments`, segments of 4 to ``n_ctx // 2`` tokens). Measured here: with d_model 32 the
    models learn the classic previous-token -> induction-head circuit; with d_model 64 and 4 heads some
    seeds learn a shifted variant (a layer-0 head at offset -3 in the key, one at -2 in the value)."""
    spec = ModelSpec(backbone="native", causal=True, attn_only=True, n_layers=2, n_heads=n_heads, d_model=d_model,
                     d_vocab=vocab, n_ctx=n_ctx, seed=seed)
    model = build_model(spec, device=device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, w = repeated_segments(g, batch_size, vocab=vocab, n_ctx=n_ctx, min_len=min_len)
        x, w = x.to(device), w.to(device)
        logits = model(x)[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1), reduction="none").view(w.shape)
        loss = (ce * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def induction_roles(model, pairs: PromptPairs) -> dict[str, Tensor]:
    """Per-head attention scores on ``pairs.clean`` (from :func:`induction_pairs`), from patterns alone:
    ``prev_token[h]``: head 0.h's mean attention from position i to i-1; ``induction[h]``: head 1.h's mean
    attention from each position of the repeat to the token after that token's first occurrence."""
    from circuitkd.engine import forward
    from circuitkd.hooks import Site, capture

    tokens = pairs.clean
    half = tokens.shape[1] // 2
    with torch.no_grad(), capture(model, [Site(0, "pattern"), Site(1, "pattern")]) as pats:
        forward(model, tokens, pairs.attention_mask)
    p0, p1 = pats[Site(0, "pattern")].mean(0), pats[Site(1, "pattern")].mean(0)  # [head dest src]
    P = tokens.shape[1]
    prev = torch.stack([p0[:, i, i - 1] for i in range(1, P)], 1).mean(1)
    ind = torch.stack([p1[:, i, i - half + 1] for i in range(half, P - 1)], 1).mean(1)
    return {"prev_token": prev, "induction": ind}


def edge_ranks(circuit: Circuit, edges) -> dict[Edge, int]:
    """Each edge's 1-based rank by ``|score|`` among the circuit's graph's edges (ties keep graph order)."""
    graph = circuit.graph
    order = circuit.top_edges(int(graph.valid.sum()))
    rank = {edge: i + 1 for i, (edge, _) in enumerate(order)}
    missing = [e for e in edges if e not in rank]
    if missing:
        raise CircuitKDError(f"edges {missing} are not in the circuit's graph ({graph.describe()})")
    return {e: rank[e] for e in edges}
