"""Tests written for mutants of circuitkd/circuits/ that the suite let live (docs/testing.md lists them).

What the other circuit tests never looked at: that patching with identical activations changes
nothing (node effects are differences from the clean run), the keys a comparison or a circuit is
saved under, node-level ACDC on the hooked path (against ACDC written out with plain bridge hooks),
and the induction model's training loop and role probe, which otherwise only CI's slow step runs.
Tiny models from config.
"""
import pytest
import torch
import torch.nn.functional as F

import circuitkd as ckd
import circuitkd.circuits as C
from circuitkd.types import PromptPairs
from tests.circuits.conftest import _scale_up, build, text_pairs


def test_node_effects_are_zero_when_clean_and_corrupt_agree():
    """Kills: postln.node_effects adding the clean baseline instead of subtracting it; validate_post_ln
    reporting the real effects under another key."""
    model = build("bert")
    p = text_pairs(n=2)
    same = PromptPairs(clean=p.clean, corrupt=p.clean.clone(), clean_answer=p.clean_answer,
                       corrupt_answer=p.corrupt_answer, position=p.position)
    graph = C.ComponentGraph.from_model(model)
    effects = C.postln.node_effects(model, graph, same, metric=C.logit_diff, frozen=False)
    torch.testing.assert_close(effects, torch.zeros(graph.n_sources), atol=1e-5, rtol=0)
    report = C.validate_post_ln(model, p, tolerance=0.4)
    real = C.postln.node_effects(model, graph, p, metric=C.logit_diff, frozen=False)
    assert real.abs().max() > 1e-3
    torch.testing.assert_close(torch.tensor(report["real"]), real)


@pytest.mark.parametrize("method", ["eap-ig", "eap-ig-activations", "mask-gradient-ig"])
def test_ig_circuits_record_their_steps(method):
    """Kills: the circuit's info saving the number of integration steps or of pairs under another key."""
    circuit = ckd.discover(build("native"), text_pairs(), method=method, steps=3)
    assert circuit.info["steps"] == 3 and circuit.info["n_pairs"] == 6


def test_a_comparison_saves_every_edge_list_under_its_name():
    """Kills: CircuitComparison.to_dict writing another key, or something other than the edges."""
    model = build("native")
    teacher = ckd.discover(model, text_pairs(), method="eap", top_k=6)
    student = ckd.discover(model, text_pairs(seed=1), method="eap", top_k=6)
    cmp = ckd.compare_circuits(teacher, student)
    assert cmp.shared, "the same model's circuits on two pair sets should share edges"
    saved = cmp.to_dict()
    for name in ("shared", "lost", "new"):
        assert saved[name] == [str(e) for e in getattr(cmp, name)]


def _bert_node_kl(model, pairs):
    """KL(p_clean || p_run) (mean over pairs) of the clean run with a set of nodes patched to their
    corrupt-run outputs, by plain bridge hooks: the embedding replaces ``blocks.0.hook_resid_pre``,
    an MLP its ``mlp.out`` output, and a head adds ``(z_corrupt - z_live) @ W_O[h]`` to the attention's
    own write (``attn.o``), so every kept node downstream recomputes from the patched stream."""
    L = model.cfg.n_layers
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.attn.hook_z" for l in range(L)] \
        + [f"blocks.{l}.mlp.out.hook_out" for l in range(L)]
    with torch.no_grad():
        clean_logits = model(pairs.clean)
        _, corrupt = model.run_with_cache(pairs.corrupt, names_filter=lambda n: n in names)

    def kl(nodes) -> float:
        hooks, live = [], {}
        for node in nodes:
            if node.kind == "embed":
                hooks.append(("blocks.0.hook_resid_pre", lambda act, hook: corrupt["blocks.0.hook_resid_pre"]))
            elif node.kind == "mlp":
                name = f"blocks.{node.layer}.mlp.out.hook_out"
                hooks.append((name, lambda act, hook, name=name: corrupt[name]))
            else:
                l, h = node.layer, node.head
                W_O = model.blocks[l].attn.W_O[h]

                def keep(act, hook, key=(l, h)):
                    live[key] = act[:, :, key[1]]

                def put(act, hook, key=(l, h), W_O=W_O):
                    return act + (corrupt[f"blocks.{key[0]}.attn.hook_z"][:, :, key[1]] - live[key]) @ W_O
                hooks += [(f"blocks.{l}.attn.hook_z", keep), (f"blocks.{l}.attn.o.hook_out", put)]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(pairs.clean)
        return float(F.kl_div(logits.double().log_softmax(-1), clean_logits.double().log_softmax(-1),
                              log_target=True, reduction="none").sum(-1).mean())
    return kl


def test_node_level_acdc_on_bert_follows_a_hand_patched_sequential_acdc():
    """Kills: node-level ACDC on the hooked path (BERT, ViT) ablating nothing (``node_ablate`` dropped).

    The reference is ACDC written out: nodes from the last to the first, each tentatively patched
    (real patching: its output replaced by the corrupt run's, everything downstream recomputed) on top
    of the nodes already removed, kept out when the KL to the clean read-out grows by less than the
    threshold. One candidate per forward (the plain algorithm) and four (batched prefixes) must both
    match it."""
    model = build("bert")
    _scale_up(model, 3.0)  # KL effects of 0.005-0.05 per node: the decisions are far from float noise
    pairs = text_pairs()
    graph = C.ComponentGraph.from_model(model, level="node")
    kl = _bert_node_kl(model, pairs)
    alone = torch.tensor([kl([n]) for n in graph.sources])
    threshold = float(alone.median())  # some nodes go, some stay
    removed, current = [], kl([])
    want_scores = torch.zeros(graph.n_sources)
    for i in reversed(range(graph.n_sources)):
        value = kl([graph.sources[j] for j in removed + [i]])
        want_scores[i] = value - current
        if value - current < threshold:
            removed.append(i)
            current = value
    want_mask = torch.ones(graph.n_sources, dtype=torch.bool)
    want_mask[removed] = False
    assert 0 < len(removed) < graph.n_sources

    for per_forward in (1, 4):
        circuit = C.acdc(model, pairs, metric=C.logit_diff, graph=graph, threshold=threshold, criterion="kl",
                         candidates_per_forward=per_forward)
        torch.testing.assert_close(circuit.scores, want_scores.float(), atol=2e-5, rtol=1e-3)
        assert circuit.mask.tolist() == want_mask.tolist()


def test_induction_roles_are_the_masked_patterns_a_hand_probe_reads():
    """Kills: ``induction_roles`` running the model without the pairs' attention mask. On the hand-set
    induction model (head 0.0 previous-token, head 1.0 induction; heads 0.1 and 1.1 zero) with right
    padding on half the pairs, the roles equal the patterns read by plain hooks from the model's own
    masked forward: the mean of ``p0[i, i-1]`` over positions 1..P-1 and of ``p1[i, i-half+1]`` over
    the repeat's positions ``half..P-2``."""
    from circuitkd.circuits import mechanisms as M

    model = M.hand_induction_model()
    pairs = M.induction_pairs(8, seed=3)
    mask = torch.ones_like(pairs.clean)
    mask[::2, -3:] = 0
    padded = PromptPairs(clean=pairs.clean, corrupt=pairs.corrupt, clean_answer=pairs.clean_answer,
                         corrupt_answer=pairs.corrupt_answer, attention_mask=mask, position=pairs.position)
    names = ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    with torch.no_grad():
        _, cache = model.run_with_cache(pairs.clean, attention_mask=mask, names_filter=lambda n: n in names)
    p0, p1 = cache[names[0]], cache[names[1]]  # [batch head dest src]
    P, half = pairs.clean.shape[1], pairs.clean.shape[1] // 2
    i = torch.arange(1, P)
    want_prev = p0[:, :, i, i - 1].mean((0, 2))
    j = torch.arange(half, P - 1)
    want_ind = p1[:, :, j, j - half + 1].mean((0, 2))

    roles = M.induction_roles(model, padded)
    torch.testing.assert_close(roles["prev_token"], want_prev, atol=1e-6, rtol=0)
    torch.testing.assert_close(roles["induction"], want_ind, atol=1e-6, rtol=0)
    assert roles["prev_token"][0] > 0.5 > roles["prev_token"][1]  # the roles sit where the model put them
    assert roles["induction"][0] > 0.5 > roles["induction"][1]


def test_the_induction_model_is_trained_on_the_repeat_by_a_hand_written_loop():
    """Kills: ``train_induction_model`` drawing segments with the wrong vocabulary, predicting from
    the wrong positions or flattening the targets wrongly (the slow test trains the full model; this
    runs three steps). The training batches are checked against the induction pattern itself (weights
    are 1 exactly where the next token repeats the token one segment back), and the trained weights
    against a loop written here: the same seeded model and AdamW, the cross-entropy of each next
    token taken by hand from log-softmax, averaged over the weighted positions."""
    from circuitkd.circuits import mechanisms as M
    from circuitkd.config import ModelSpec
    from circuitkd.models.build import build_model

    opts = {"vocab": 12, "n_ctx": 10, "min_len": 2}
    g = torch.Generator().manual_seed(5)
    x, w = M.repeated_segments(g, 16, **opts)
    assert x.shape == (16, 10) and w.shape == (16, 9) and int(x.max()) < 12
    for b in range(16):
        S = int(w[b].sum()) + 1  # the repeat predicts all but its first token
        t = w[b].nonzero().flatten()
        assert S >= 2 and bool((t[1:] - t[:-1] == 1).all())  # one contiguous repeat
        assert bool((x[b, t + 1] == x[b, t + 1 - S]).all())  # the next token is the one a segment back

    trained = M.train_induction_model(seed=4, n_heads=2, d_model=16, steps=3, batch_size=8, lr=1e-2, **opts)
    spec = ModelSpec(backbone="native", causal=True, attn_only=True, n_layers=2, n_heads=2, d_model=16,
                     d_vocab=12, n_ctx=10, seed=4)
    model = build_model(spec, device="cpu")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        x, w = M.repeated_segments(g, 8, **opts)
        logp = model(x).log_softmax(-1)  # [batch pos vocab]
        nll = -logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]  # position t predicts token t+1
        loss = (nll * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    untrained = build_model(spec, device="cpu").state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[name], value, atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.equal(v, untrained[k]) for k, v in model.state_dict().items())


def test_discover_records_the_metric_and_a_graph_describes_itself():
    """Kills: ``discover`` saving the metric's name under another key; ``ComponentGraph.describe``
    writing a marker for models that have MLPs."""
    circuit = ckd.discover(build("native"), text_pairs(), method="eap", metric="prob_diff", top_k=4)
    assert circuit.info["metric"] == "prob_diff"
    assert circuit.graph.describe() == "native graph, 2 layers x 2 heads, edge level"
    attn_only = C.ComponentGraph.from_model(C.mechanisms.hand_induction_model(), per_position=True, n_pos=16,
                                            level="node")
    assert attn_only.describe() == "native graph, 2 layers x 2 heads, attention only, 16 positions, node level"


def test_comparing_a_node_level_circuit_is_refused_saying_why():
    """Kills: the refusal of node-level circuits in ``compare_circuits`` losing its message."""
    from circuitkd.errors import CircuitKDError

    model, pairs = build("native"), text_pairs()
    edges = ckd.discover(model, pairs, method="eap", top_k=4)
    nodes = C.acdc(model, pairs, metric=C.logit_diff, graph=C.ComponentGraph.from_model(model, level="node"))
    for teacher, student in ((edges, nodes), (nodes, edges)):
        with pytest.raises(CircuitKDError, match="^compare_circuits compares edge-level circuits; this one is node level$"):
            ckd.compare_circuits(teacher, student)


def test_acdc_sweep_keeps_an_edge_whose_damage_equals_the_threshold_as_acdc_does():
    """Kills: the sweep removing an edge whose damage equals its threshold (``<=`` for ``<``). ACDC
    removes an edge when the criterion moves by *less* than the threshold. On the hand-set induction
    model, heads 0.1 and 1.1 are zero, so the edges out of and into them move the logit difference by
    exactly 0: at threshold 0 ACDC keeps them, and every run of a sweep must agree with it."""
    model, pairs = C.mechanisms.hand_induction_model(), C.mechanisms.induction_pairs(8)
    graph = C.ComponentGraph.from_model(model)
    thresholds = [0.0, 0.05]
    sweep = C.acdc_sweep(model, pairs, metric=C.logit_diff, graph=graph, thresholds=thresholds, criterion="metric")
    for t, got in zip(thresholds, sweep):
        ref = C.acdc(model, pairs, metric=C.logit_diff, graph=graph, threshold=t, criterion="metric",
                     candidates_per_forward=1)
        assert torch.equal(got.mask, ref.mask), t
        torch.testing.assert_close(got.scores, ref.scores, atol=1e-6, rtol=1e-5)
    at_zero = sweep[0]
    ties = (at_zero.scores == 0) & graph.valid
    assert int(ties.sum()) >= 4 and bool(at_zero.mask[ties].all())  # the ties exist and stay in
