"""BERT's frozen-LayerNorm edges against a hand-patched 2-layer BERT, at tight tolerance.

The definition (circuitkd.circuits.forward): every stream LayerNorm's scale is frozen at its
clean-run value, so ``LN(x) = gamma * (x - mean x) / sigma_clean + beta`` is affine and a source's
``corrupt - clean`` difference reaches a reader through the linear parts
``d -> gamma * (d - mean d) / sigma_clean`` of the norms between them. Here each edge is patched
by hand with TransformerLens hooks: the norms are frozen by replacing each ``ln.hook_out``, and
the difference, carried through the frozen norms by hand, is added at the one reader. Nothing is
imported from circuitkd's edge-patching, metric or hook code.
"""
from __future__ import annotations

import torch

import circuitkd.circuits as C
from circuitkd.types import Edge, Node

from .conftest import _scale_up, build, text_pairs

torch.set_num_threads(1)


def _logit_diff(logits, pairs):
    read = logits[:, 0] if logits.dim() == 3 else logits
    idx = torch.arange(read.shape[0])
    return read[idx, pairs.clean_answer] - read[idx, pairs.corrupt_answer]


def _norm_names(L):
    return [f"blocks.{l}.{n}" for l in range(L) for n in ("ln1", "ln2")]  # stream order: ln1_0, ln2_0, ln1_1, ...


def _clean_scales(model, tokens, L):
    names = [f"{n}.hook_in" for n in _norm_names(L)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    out = {}
    for n in _norm_names(L):
        x = cache[f"{n}.hook_in"]
        out[n] = (x.var(-1, unbiased=False, keepdim=True) + model.get_submodule(n).eps).sqrt()
    return out


def _sources(model, tokens, L, H):
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.attn.hook_z" for l in range(L)] \
        + [f"blocks.{l}.mlp.out.hook_out" for l in range(L)]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    out = [cache["blocks.0.hook_resid_pre"]]
    for l in range(L):
        W_O = model.blocks[l].attn.W_O
        out += [cache[f"blocks.{l}.attn.hook_z"][:, :, h] @ W_O[h] for h in range(H)]
        out.append(cache[f"blocks.{l}.mlp.out.hook_out"])
    return out, logits


def test_frozen_norm_exact_and_eap_edges_equal_a_hand_patched_bert():
    model = build("bert")
    _scale_up(model, 3.0)  # larger edge effects (up to ~0.3), so 1e-5 is a tight tolerance
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norms as after training, not the identity init (gamma = 1 would hide a lost gamma)
        for n in _norm_names(model.cfg.n_layers):
            ln = model.get_submodule(n)
            ln.weight.copy_(1 + 0.5 * torch.randn(ln.weight.shape, generator=g))
            ln.bias.copy_(0.1 * torch.randn(ln.bias.shape, generator=g))
    pairs = text_pairs()
    L, H = model.cfg.n_layers, model.cfg.n_heads
    graph = C.ComponentGraph.from_model(model)
    sigma = _clean_scales(model, pairs.clean, L)
    gamma = {n: model.get_submodule(n) for n in _norm_names(L)}
    clean_src, clean_logits = _sources(model, pairs.clean, L, H)
    corrupt_src, _ = _sources(model, pairs.corrupt, L, H)

    store: dict = {}

    def freeze(name):
        def fn(act, hook):
            x = store[name]
            ln = gamma[name]
            return (x - x.mean(-1, keepdim=True)) / sigma[name] * ln.weight + ln.bias
        return fn

    def keep(key):
        def fn(act, hook):
            store[key] = act
        return fn

    def frozen_norms():
        """Fresh hooks that freeze every LayerNorm at its clean-run scale (storing each norm's input)."""
        store.clear()
        return [hook for n in _norm_names(L) for hook in ((f"{n}.hook_in", keep(n)), (f"{n}.hook_out", freeze(n)))]

    def through(d, first, last):
        """Carry a difference through the frozen norms with stream index first..last (inclusive)."""
        for n in _norm_names(L)[first:last + 1]:
            ln = gamma[n]
            d = (d - d.mean(-1, keepdim=True)) / sigma[n] * ln.weight
        return d

    # sources in the graph's order with the index of the first norm after each
    first_norm = [0] + [i for l in range(L) for i in [2 * l] * H + [2 * l + 1]]
    readers = [("head", l, h, p) for l in range(L) for h in range(H) for p in "qkv"]
    readers = [r for l in range(L) for r in readers if r[1] == l] + [("mlp", l, None, "in") for l in range(L)] \
        + [("output", None, None, "in")]
    circuit = C.exact(model, pairs, metric=C.logit_diff, graph=graph)
    base = _logit_diff(clean_logits, pairs)
    checked = 0
    for kind, l, h, port in readers:
        node = Node("output") if kind == "output" else Node(kind, l, h)
        last = {"head": 2 * (l or 0) - 1, "mlp": 2 * (l or 0), "output": 2 * L - 1}[kind]
        for s, src in enumerate(graph.sources):
            if not _upstream(src, node):
                continue
            d = through(corrupt_src[s] - clean_src[s], first_norm[s], last)
            hooks = frozen_norms()
            if kind == "head":
                W = getattr(model.blocks[l].attn, f"W_{port.upper()}")[h]
                b = getattr(model.blocks[l].attn, f"b_{port.upper()}")[h]

                def put(act, hook, W=W, b=b, d=d, h=h, l=l):
                    act = act.clone()
                    act[:, :, h] = (store[f"resid{l}"] + d) @ W + b
                    return act
                hooks += [(f"blocks.{l}.hook_resid_pre", keep(f"resid{l}")), (f"blocks.{l}.attn.hook_{port}", put)]
            else:
                name = f"blocks.{l}.mlp.hook_in" if kind == "mlp" else "pooler.hook_in"
                hooks.append((name, lambda act, hook, d=d: act + d))
            with torch.no_grad(), model.hooks(fwd_hooks=hooks):
                expected = float((_logit_diff(model(pairs.clean), pairs) - base).mean())
            got = float(circuit.scores[graph.edge_cell(Edge(src, node, port))])
            assert abs(got - expected) < 1e-5 + 1e-4 * abs(expected), (str(src), str(node), port, got, expected)
            checked += 1
    assert checked == int(graph.valid.sum())
    assert circuit.scores.abs().max() > 1e-2

    # EAP on the same frozen-norm model: the gradient at each reader's input, by autograd through the
    # hand-frozen norms, times each source's difference carried to that reader
    eap = C.eap(model, pairs, metric=C.logit_diff, graph=graph)
    ref = torch.zeros(graph.shape)
    for kind, l, h, port in readers:
        node = Node("output") if kind == "output" else Node(kind, l, h)
        last = {"head": 2 * (l or 0) - 1, "mlp": 2 * (l or 0), "output": 2 * L - 1}[kind]
        eps = torch.zeros_like(clean_src[0], requires_grad=True)
        hooks = frozen_norms()
        if kind == "head":
            W = getattr(model.blocks[l].attn, f"W_{port.upper()}")[h]
            b = getattr(model.blocks[l].attn, f"b_{port.upper()}")[h]

            def put_eps(act, hook, W=W, b=b, h=h, l=l):
                act = act.clone()
                act[:, :, h] = (store[f"resid{l}"] + eps) @ W + b
                return act
            hooks += [(f"blocks.{l}.hook_resid_pre", keep(f"resid{l}")), (f"blocks.{l}.attn.hook_{port}", put_eps)]
        else:
            hooks.append((f"blocks.{l}.mlp.hook_in" if kind == "mlp" else "pooler.hook_in",
                          lambda act, hook: act + eps))
        with model.hooks(fwd_hooks=hooks):
            (grad,) = torch.autograd.grad(_logit_diff(model(pairs.clean), pairs).sum(), eps)
        for s, src in enumerate(graph.sources):
            if _upstream(src, node):
                d = through(corrupt_src[s] - clean_src[s], first_norm[s], last)
                ref[graph.edge_cell(Edge(src, node, port))] = (d * grad).sum() / len(pairs)
    torch.testing.assert_close(eap.scores, ref, atol=1e-5, rtol=1e-4)
    assert ref.abs().max() > 1e-2


def _upstream(src, node):
    stage = lambda n: 0 if n.kind == "embed" else (2 * n.layer + 1 if n.kind == "head" else  # noqa: E731
                                                   (2 * n.layer + 2 if n.kind == "mlp" else 10**9))
    return stage(src) < stage(node)
