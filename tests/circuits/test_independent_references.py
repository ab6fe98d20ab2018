"""Circuit methods against references written here with plain TransformerLens hooks and autograd.

Nothing below imports circuitkd's patched_forward, source_values, metrics or hook table: the
references write hook names and the edge definition out by hand, so a bug in the shared
edge-patching code cannot hide in both the method and its check.

Edge definition on a pre-LN native model (additive residual stream): the sources are the
embedding (``blocks.0.hook_resid_pre``), each head's own write ``z_h @ W_O[h]`` (b_O belongs to
no source) and each MLP's output; patching ``src -> dst`` adds ``corrupt_src - clean_src`` to the
residual stream that ``dst`` reads, before its LayerNorm, for that port only (q, k, v of one head,
an MLP's input, or the classifier's input ``ln_final``), on the clean run.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import circuitkd.circuits as C
from circuitkd.types import Edge, Node, PromptPairs

from .conftest import build, text_pairs

torch.set_num_threads(1)


# ---------------------------------------------------------------------------- the hand-written reference


def _run(model, tokens, fwd_hooks=(), mask=None):
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        return model(tokens) if mask is None else model(tokens, attention_mask=mask)


def _read(logits):
    return logits[:, 0] if logits.dim() == 3 else logits  # the CLS read-out of the native classifier


def _logit_diff(logits, pairs):
    read = _read(logits)
    idx = torch.arange(read.shape[0])
    return read[idx, pairs.clean_answer] - read[idx, pairs.corrupt_answer]


def _kl_clean_to_run(run_logits, clean_logits):
    """KL(p_clean || p_run) per example, by torch's own kl_div (input = log q, target = log p)."""
    return F.kl_div(_read(run_logits).double().log_softmax(-1), _read(clean_logits).double().log_softmax(-1),
                    log_target=True, reduction="none").sum(-1)


def _sources(model, tokens, mask):
    """Every source's write into the residual stream, in the graph's order, and the logits."""
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)] \
        + [f"blocks.{l}.hook_mlp_out" for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": mask}
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names, **kw)
    out = [cache["blocks.0.hook_resid_pre"]]
    for l in range(model.cfg.n_layers):
        W_O = model.blocks[l].attn.W_O  # [head d_head d_model]
        z = cache[f"blocks.{l}.attn.hook_z"]
        out += [torch.einsum("bpe,ed->bpd", z[:, :, h], W_O[h]) for h in range(model.cfg.n_heads)]
        out.append(cache[f"blocks.{l}.hook_mlp_out"])
    return torch.stack(out, 0), logits  # [source batch pos d_model]


def _readers(model):
    out = []
    for l in range(model.cfg.n_layers):
        out += [("head", l, h, p) for h in range(model.cfg.n_heads) for p in "qkv"]
        out.append(("mlp", l, None, "in"))
    out.append(("output", None, None, "in"))
    return out


def _graph_cell(graph, reader, src_index):
    kind, l, h, port = reader
    node = Node("output") if kind == "output" else Node(kind, l, h)
    srcs = graph.sources
    return graph.edge_cell(Edge(srcs[src_index], node, port))


def _stage(kind, layer):
    return 0 if kind == "embed" else (2 * layer + 1 if kind == "head" else 2 * layer + 2)


def _upstream(model, reader):
    """Indices of the sources upstream of ``reader`` (the graph's source order, built by hand)."""
    kind, l, _, _ = reader
    L, H = model.cfg.n_layers, model.cfg.n_heads
    srcs = [("embed", None)] + [(k, ll) for ll in range(L) for k in ["head"] * H + ["mlp"]]
    limit = 10**9 if kind == "output" else _stage(kind, l)
    return [i for i, (k, ll) in enumerate(srcs) if _stage(k, ll) < limit]


def _reader_hooks(model, reader, delta):
    """Hooks that add ``delta`` [batch pos d_model] to what ``reader`` reads, before its LayerNorm
    (``delta`` may be a function of no arguments, called when the reader reads: a live difference)."""
    kind, l, h, port = reader
    value = delta if callable(delta) else (lambda: delta)
    if kind == "output":
        return [("ln_final.hook_in", lambda act, hook: act + value())]
    if kind == "mlp":
        return [(f"blocks.{l}.ln2.hook_in", lambda act, hook: act + value())]
    store = {}
    ln = model.blocks[l].ln1
    W = getattr(model.blocks[l].attn, f"W_{port.upper()}")[h]  # [d_model d_head]
    b = getattr(model.blocks[l].attn, f"b_{port.upper()}")[h]

    def keep(act, hook):
        store["resid"] = act

    def replace(act, hook):
        x = store["resid"] + value()
        x = F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, model.cfg.eps)
        out = act.clone()
        out[:, :, h] = x @ W + b
        return out

    return [(f"blocks.{l}.hook_resid_pre", keep), (f"blocks.{l}.attn.hook_{port}", replace)]


@pytest.fixture(scope="module", params=["unpadded", "padded"])
def setup(request):
    torch.manual_seed(0)
    model = build("native")
    pairs = text_pairs()
    if request.param == "padded":  # two pairs end in padding: the mask must reach every patched run
        mask = torch.ones_like(pairs.clean)
        mask[0, -2:] = 0
        mask[1, -1:] = 0
        pairs = PromptPairs(clean=pairs.clean, corrupt=pairs.corrupt, clean_answer=pairs.clean_answer,
                            corrupt_answer=pairs.corrupt_answer, attention_mask=mask, position=0)
    clean_src, clean_logits = _sources(model, pairs.clean, pairs.attention_mask)
    corrupt_src, corrupt_logits = _sources(model, pairs.corrupt, pairs.attention_mask)
    graph = C.ComponentGraph.from_model(model)
    return model, pairs, graph, clean_src, corrupt_src, clean_logits, corrupt_logits


def _edge_patched_logits(setup):
    """{(source index, reader): logits of the clean run with that one edge patched to corrupt}."""
    model, pairs, graph, clean_src, corrupt_src, *_ = setup
    out = {}
    with torch.no_grad():
        for reader in _readers(model):
            for s in _upstream(model, reader):
                delta = corrupt_src[s] - clean_src[s]
                out[(s, reader)] = _run(model, pairs.clean, _reader_hooks(model, reader, delta), pairs.attention_mask)
    return out


@pytest.fixture(scope="module")
def edge_logits(setup):
    return _edge_patched_logits(setup)


def test_reference_sources_sum_to_the_residual_stream(setup):
    """Sanity of the hand reference: the sources plus the b_O's rebuild ln_final's input exactly."""
    model, pairs, graph, clean_src, *_ = setup
    with torch.no_grad():
        kw = {} if pairs.attention_mask is None else {"attention_mask": pairs.attention_mask}
        _, cache = model.run_with_cache(pairs.clean, names_filter=lambda n: n == "ln_final.hook_in", **kw)
    b_O = sum(model.blocks[l].attn.b_O for l in range(model.cfg.n_layers))
    torch.testing.assert_close(clean_src.sum(0) + b_O, cache["ln_final.hook_in"], atol=1e-5, rtol=1e-5)
    assert len(_upstream(model, _readers(model)[-1])) == graph.n_sources


def test_exact_equals_hand_patched_edges(setup, edge_logits):
    model, pairs, graph, _, _, clean_logits, _ = setup
    circuit = C.exact(model, pairs, metric=C.logit_diff, graph=graph)
    ref = torch.zeros(graph.shape)
    for (s, reader), logits in edge_logits.items():
        ref[_graph_cell(graph, reader, s)] = (_logit_diff(logits, pairs) - _logit_diff(clean_logits, pairs)).mean()
    assert len(edge_logits) == int(graph.valid.sum())
    torch.testing.assert_close(circuit.scores, ref, atol=1e-5, rtol=1e-4)
    # most edges matter on this model, so a q/k/v or in/output mix-up cannot pass at 1e-5
    assert ref.abs().max() > 0.05 and int((ref.abs() > 1e-3).sum()) > 0.8 * len(edge_logits)


def _reader_gradients(setup, tokens, metric, embed=None, first_hooks=()):
    """d metric(sum over pairs) / d (what each reader reads), by autograd through hooks added here
    (``first_hooks`` run before the readers' own hooks)."""
    model, pairs = setup[0], setup[1]
    grads = {}
    for reader in _readers(model):
        eps = torch.zeros(tokens.shape + (model.cfg.d_model,), requires_grad=True)
        hooks = list(first_hooks) + _reader_hooks(model, reader, eps)
        if embed is not None:
            hooks = [("blocks.0.hook_resid_pre", lambda act, hook: embed)] + hooks
        value = metric(_run(model, tokens, hooks, pairs.attention_mask)).sum()
        (g,) = torch.autograd.grad(value, eps, allow_unused=True)  # unused: a first hook cut the reader off
        grads[reader] = torch.zeros_like(eps) if g is None else g
    return grads


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_eap_equals_hand_gradient_times_difference(setup, direction):
    model, pairs, graph, clean_src, corrupt_src, *_ = setup
    base, delta = (pairs.clean, corrupt_src - clean_src) if direction == "noise" \
        else (pairs.corrupt, clean_src - corrupt_src)
    grads = _reader_gradients(setup, base, lambda lg: _logit_diff(lg, pairs))
    ref = torch.zeros(graph.shape)
    for reader, g in grads.items():
        for s in _upstream(model, reader):
            ref[_graph_cell(graph, reader, s)] = (delta[s] * g).sum() / len(pairs)
    circuit = C.eap(model, pairs, metric=C.logit_diff, graph=graph, direction=direction)
    torch.testing.assert_close(circuit.scores, ref, atol=1e-5, rtol=1e-4)
    assert ref.abs().max() > 0.05


@pytest.mark.parametrize("steps", [3, 4])
def test_eap_ig_equals_a_hand_written_riemann_sum(setup, steps):
    """Gradients at embeddings corrupt + (k/steps)(clean - corrupt), k = 1..steps, averaged, times delta."""
    model, pairs, graph, clean_src, corrupt_src, *_ = setup
    total = {}
    for k in range(1, steps + 1):
        emb = (corrupt_src[0] + (k / steps) * (clean_src[0] - corrupt_src[0])).detach()
        grads = _reader_gradients(setup, pairs.clean, lambda lg: _logit_diff(lg, pairs), embed=emb)
        for reader, g in grads.items():
            total[reader] = total.get(reader, 0) + g
    ref = torch.zeros(graph.shape)
    for reader, g in total.items():
        for s in _upstream(model, reader):
            ref[_graph_cell(graph, reader, s)] = ((corrupt_src[s] - clean_src[s]) * g / steps).sum() / len(pairs)
    circuit = C.eap_ig(model, pairs, metric=C.logit_diff, graph=graph, steps=steps, steps_per_forward=2)
    torch.testing.assert_close(circuit.scores, ref, atol=1e-5, rtol=1e-4)
    # IG differs from plain EAP here, so an implementation that ignored the steps could not pass
    eap = C.eap(model, pairs, metric=C.logit_diff, graph=graph)
    assert (circuit.scores - eap.scores).abs().max() > 1e-2


@pytest.mark.parametrize("native_runner", [True, False])
def test_acdc_kl_criterion_value_and_direction(setup, edge_logits, monkeypatch, native_runner):
    """Threshold below zero rejects every removal: each edge's score is KL(p_clean || p_edge_removed)."""
    model, pairs, graph, _, _, clean_logits, corrupt_logits = setup
    with (contextlib.nullcontext() if native_runner else C.hooked_only()):
        circuit = C.acdc(model, pairs, metric=C.logit_diff, graph=graph, threshold=-1.0, criterion="kl")
    assert bool(circuit.mask[graph.valid].all())
    ref = torch.zeros(graph.shape)
    wrong_way = torch.zeros(graph.shape)
    for (s, reader), logits in edge_logits.items():
        cell = _graph_cell(graph, reader, s)
        ref[cell] = _kl_clean_to_run(logits, clean_logits).mean()
        wrong_way[cell] = _kl_clean_to_run(clean_logits, logits).mean()
    torch.testing.assert_close(circuit.scores, ref, atol=1e-6, rtol=1e-4)
    assert (ref - wrong_way).abs().max() > 10 * 1e-6 + 1e-4 * ref.abs().max()
    # accepting every removal ends on the corrupt run: final value KL(p_clean || p_corrupt)
    full = C.acdc(model, pairs, metric=C.logit_diff, graph=graph, threshold=1e9, criterion="kl")
    expected = float(_kl_clean_to_run(corrupt_logits, clean_logits).mean())
    assert abs(full.info["final_value"] - expected) < 1e-5
    assert abs(expected - float(_kl_clean_to_run(clean_logits, corrupt_logits).mean())) > 1e-4
    assert not bool(full.mask.any())


def test_acdc_metric_criterion_is_the_drop_of_the_metric(setup, edge_logits):
    model, pairs, graph, _, _, clean_logits, _ = setup
    circuit = C.acdc(model, pairs, metric=C.logit_diff, graph=graph, threshold=-1e9, criterion="metric")
    ref = torch.zeros(graph.shape)
    for (s, reader), logits in edge_logits.items():
        ref[_graph_cell(graph, reader, s)] = (_logit_diff(clean_logits, pairs) - _logit_diff(logits, pairs)).mean()
    torch.testing.assert_close(circuit.scores, ref, atol=1e-5, rtol=1e-4)
    assert ref.abs().max() > 0.05
