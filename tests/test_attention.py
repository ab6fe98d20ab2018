"""Attention statistics, shortcut heads, head matching and CKA, each against a slow obvious reference."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from circuitkd import attention as A
from circuitkd.config import ModelSpec
from circuitkd.data.task import Split, Task
from circuitkd.engine import collect, run
from circuitkd.errors import CircuitKDError
from circuitkd.hooks import Site, hook_name
from circuitkd.models import build_model
from circuitkd.models.build import class_logits
from tests.conftest import toy_text_task

VOCAB, SEQ = 24, 12


def nli_like_split(n: int = 10, seed: int = 0) -> Split:
    """Hand-made premise/hypothesis split: CLS p p p SEP h h h SEP [pad]; word 9 is the 'negation'."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, SEQ, dtype=torch.long)
    mask = torch.zeros(n, SEQ, dtype=torch.long)
    tc = {k: torch.zeros(n, SEQ, dtype=torch.bool) for k in ("cls", "sep", "premise", "hypothesis", "negation", "overlap")}
    labels = torch.randint(0, 3, (n,), generator=g)
    for i in range(n):
        lp, lh = int(torch.randint(2, 5, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
        prem = torch.randint(10, VOCAB, (lp,), generator=g)
        hyp = torch.randint(10, VOCAB, (lh,), generator=g)
        hyp[0] = prem[int(torch.randint(0, lp, (1,), generator=g))]  # at least one shared word
        if i % 2 == 0:
            hyp[-1] = 9
        row = [1, *prem.tolist(), 2, *hyp.tolist(), 2]
        x[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        tc["cls"][i, 0] = True
        tc["sep"][i, [lp + 1, len(row) - 1]] = True
        tc["premise"][i, 1: lp + 1] = True
        tc["hypothesis"][i, lp + 2: lp + 2 + lh] = True
        tc["negation"][i] = x[i] == 9
        shared = set(prem.tolist()) & set(hyp.tolist())
        tc["overlap"][i] = torch.tensor([int(t) in shared for t in x[i]]) & mask[i].bool()
    neg_label = torch.where(tc["negation"].any(1), torch.full((n,), 2), torch.full((n,), -1))
    return Split(inputs=x, labels=labels, bias_labels={"negation": neg_label}, groups=torch.zeros(n, dtype=torch.long),
                 attention_mask=mask, token_classes=tc)


def nli_like_task(n: int = 10) -> Task:
    class Tok:
        pad_token_id = 0
        vocab_size = VOCAB

        def convert_ids_to_tokens(self, ids):
            return [f"w{i}" for i in ids]

    split = nli_like_split(n)
    return Task(name="nli-like", modality="text", n_classes=3, label_names=("e", "n", "c"), bias_types=("negation",),
                group_names=("all",), splits={"train": split, "id_test": split, "ood_test": split}, tokenizer=Tok())


def tiny(backbone: str = "native", **kw):
    preset = {"native": "tiny", "bert": "bert-student"}[backbone]
    base = dict(d_vocab=VOCAB, n_ctx=SEQ, n_classes=3)
    if backbone == "bert":
        base.update(d_model=32, n_heads=2, n_layers=1)
    base.update(kw)
    return build_model(ModelSpec.preset(preset, **base), device="cpu")


# ---------------------------------------------------------------------------- reference statistics

def reference_stats(patterns: dict, split: Split, shortcut: list[str]) -> dict:
    """Every statistic by explicit loops over examples, heads and positions (read-out position 0)."""
    L = len(patterns)
    n, H = patterns[Site(0, "pattern")].shape[:2]
    classes = dict(split.token_classes)
    classes["shortcut"] = torch.stack([classes[c] for c in shortcut]).any(0)
    out: dict = {f"{src}:{c}": torch.zeros(L, H, dtype=torch.float64) for src in ("read", "all") for c in classes}
    for name in ("entropy", "entropy_read", "prev", "next", "dup", "align"):
        out[name] = torch.zeros(L, H, dtype=torch.float64)
    for layer in range(L):
        P = patterns[Site(layer, "pattern")].double()
        for h in range(H):
            for c, cmask in classes.items():
                vals_r, vals_a = [], []
                for e in range(n):
                    if not cmask[e].any():
                        continue
                    length = int(split.attention_mask[e].sum())
                    m = cmask[e].double()
                    vals_r.append(float(P[e, h, 0] @ m))
                    vals_a.append(np.mean([float(P[e, h, q] @ m) for q in range(length)]))
                out[f"read:{c}"][layer, h] = np.mean(vals_r)
                out[f"all:{c}"][layer, h] = np.mean(vals_a)
            ent, ent_r, prev, nxt, dup, align = [], [], [], [], [], []
            for e in range(n):
                length = int(split.attention_mask[e].sum())
                tok = split.inputs[e]
                A_ = P[e, h]

                def entropy(q):
                    return -sum(float(p) * math.log(float(p)) for p in A_[q, :length] if p > 0)

                ent.append(np.mean([entropy(q) for q in range(length)]))
                ent_r.append(entropy(0))
                prev.append(np.mean([float(A_[q, q - 1]) for q in range(1, length)]))
                nxt.append(np.mean([float(A_[q, q + 1]) for q in range(length - 1)]))
                d = [sum(float(A_[q, k]) for k in range(length) if k != q and tok[k] == tok[q])
                     for q in range(length) if any(k != q and tok[k] == tok[q] for k in range(length))]
                if d:
                    dup.append(np.mean(d))
                hyp, prem = split.token_classes["hypothesis"][e], split.token_classes["premise"][e]
                a = [sum(float(A_[q, k]) for k in range(length) if prem[k] and tok[k] == tok[q])
                     for q in range(length) if hyp[q] and any(prem[k] and tok[k] == tok[q] for k in range(length))]
                if a:
                    align.append(np.mean(a))
            for name, vals in (("entropy", ent), ("entropy_read", ent_r), ("prev", prev), ("next", nxt),
                               ("dup", dup), ("align", align)):
                out[name][layer, h] = np.mean(vals)
    return out


def test_statistics_match_a_direct_computation_from_cached_patterns():
    split = nli_like_split(10)
    model = tiny(n_layers=2, n_heads=2)
    stats = A.attention_stats(model, split, n=None, batch_size=4, shortcut=["negation", "overlap"])
    patterns = collect(model, split, ["pattern"])
    ref = reference_stats(patterns, split, ["negation", "overlap"])
    for c in list(split.token_classes) + ["shortcut"]:
        assert torch.allclose(stats.from_read[c].double(), ref[f"read:{c}"], atol=1e-5), c
        assert torch.allclose(stats.from_all[c].double(), ref[f"all:{c}"], atol=1e-5), c
    assert torch.allclose(stats.entropy.double(), ref["entropy"], atol=1e-5)
    assert torch.allclose(stats.entropy_read.double(), ref["entropy_read"], atol=1e-5)
    assert torch.allclose(stats.prev_token.double(), ref["prev"], atol=1e-5)
    assert torch.allclose(stats.next_token.double(), ref["next"], atol=1e-5)
    assert torch.allclose(stats.duplicate_token.double(), ref["dup"], atol=1e-5)
    assert torch.allclose(stats.alignment.double(), ref["align"], atol=1e-5)
    assert stats.class_counts["negation"] == 5 and stats.class_counts["shortcut"] == 10
    # the read-out position's attention over a partition of the real tokens sums to one
    parts = ["cls", "premise", "sep", "hypothesis"]
    assert torch.allclose(sum(stats.from_read[c] for c in parts), torch.ones(2, 2), atol=1e-5)


def test_statistics_stream_batch_size_does_not_change_them():
    split = nli_like_split(12)
    model = tiny(n_layers=1, n_heads=2)
    a = A.attention_stats(model, split, n=None, batch_size=5, shortcut="negation")
    b = A.attention_stats(model, split, n=None, batch_size=12, shortcut="negation")
    for c in a.from_read:
        assert torch.allclose(a.from_read[c], b.from_read[c], atol=1e-6)
    assert torch.allclose(a.entropy, b.entropy, atol=1e-6)
    assert a.n_examples == b.n_examples == 12


def test_bert_statistics_use_patterns_from_q_and_k():
    split = nli_like_split(6)
    model = tiny("bert")
    stats = A.attention_stats(model, split, n=None, batch_size=4, shortcut="negation")
    patterns = collect(model, split, ["pattern"])
    ref = reference_stats(patterns, split, ["negation"])
    assert torch.allclose(stats.from_read["negation"].double(), ref["read:negation"], atol=1e-5)
    parts = ["cls", "premise", "sep", "hypothesis"]
    assert torch.allclose(sum(stats.from_read[c] for c in parts), torch.ones(1, 2), atol=1e-5)
    assert stats.backbone == "bert"


def colored_split(n: int = 6) -> Split:
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(n, 3, 28, 28, generator=g)
    colored = torch.zeros(n, 28, 28, dtype=torch.bool)
    colored[:, 3:10, 15:20] = True  # patches (0, 2) and (1, 2) of a 4x4 grid of 7x7 patches
    colored[::2, 25, 25] = True  # patch (3, 3) in every other image
    labels = torch.randint(0, 2, (n,), generator=g)
    return Split(inputs=pixels, labels=labels, bias_labels={"color": 1 - labels}, groups=labels,
                 token_classes={"colored": colored})


def test_vit_patch_masks_and_attention_to_coloured_patches():
    split = colored_split()
    masks = A.position_masks(split.token_classes["colored"][:, None], 17)[:, 0]
    expected = torch.zeros(6, 17, dtype=torch.bool)
    expected[:, [1 + 2, 1 + 4 + 2]] = True
    expected[::2, 1 + 15] = True
    assert torch.equal(masks, expected)
    model = build_model(ModelSpec.preset("vit-student", n_classes=2, d_model=32, n_layers=1), device="cpu")
    stats = A.attention_stats(model, split, n=None, batch_size=4)  # "colored" found from bias "color"
    assert stats.shortcut == ("colored",)
    pattern = collect(model, split, ["pattern"])[Site(0, "pattern")]
    direct = (pattern[:, :, 0] * expected[:, None].float()).sum(-1).mean(0)
    assert torch.allclose(stats.from_read["colored"][0], direct, atol=1e-5)
    assert stats.duplicate_token is None and stats.alignment is None


# ---------------------------------------------------------------------------- matching

def permuted_heads(model, perm: list[int]):
    """A copy of a one-layer native model whose head i is the original head perm[i] (same function)."""
    student = copy.deepcopy(model)
    attn = student.blocks[0].attn._original_component
    H = len(perm)
    with torch.no_grad():
        for lin in (attn.q, attn.k, attn.v):
            w, b = lin._original_component.weight, lin._original_component.bias
            w.copy_(w.view(H, -1, w.shape[-1])[perm].reshape(w.shape))
            b.copy_(b.view(H, -1)[perm].reshape(b.shape))
        w = attn.o._original_component.weight
        w.copy_(w.view(w.shape[0], H, -1)[:, perm].reshape(w.shape))
    return student


@pytest.mark.parametrize("similarity", ["js", "corr"])
def test_matching_recovers_a_permutation_of_the_teachers_heads(similarity):
    task = nli_like_task(12)
    teacher = tiny(n_layers=1, n_heads=4)
    perm = [2, 0, 3, 1]
    student = permuted_heads(teacher, perm)
    x, m = task.ood_test.inputs, task.ood_test.attention_mask
    assert torch.allclose(class_logits(student, x, m), class_logits(teacher, x, m), atol=1e-5)
    diff = A.diff_attention(teacher, student, task, n=None, batch_size=5, similarity=similarity, confirm="none")
    assert [(s, t) for t, s, _ in diff.matching] == [((0, i), (0, perm[i])) for i in range(4)]
    assert all(sim > 0.999 for _, _, sim in diff.matching)
    assert diff.matching_method == "hungarian (one-to-one, 0 of 4 teacher heads unmatched)"
    assert torch.allclose(diff.shortcut_change, torch.zeros(4), atol=1e-5)
    assert not torch.allclose(diff.js.diagonal(), torch.zeros(4), atol=1e-6)  # identity would be wrong
    js_perm = torch.stack([diff.js[perm[i], i] for i in range(4)])  # [teacher, student]
    assert torch.allclose(js_perm, torch.zeros(4), atol=1e-6)


def test_match_heads_rectangular_and_greedy():
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.85, 0.2, 0.3]]).T  # [teacher 3, student 2]
    pairs, method = A.match_heads(sim, method="hungarian")
    assert [(s, t) for t, s, _ in pairs] == [(0, 1), (1, 0)]  # one-to-one beats both taking teacher 0
    assert method == "hungarian (one-to-one, 1 of 3 teacher heads unmatched)"
    pairs, method = A.match_heads(sim, method="greedy")
    assert [(s, t) for t, s, _ in pairs] == [(0, 0), (1, 0)]
    assert method.startswith("greedy") and "1 of 3 teacher heads used" in method
    pairs, method = A.match_heads(sim.T, method="hungarian")
    assert len(pairs) == 2 and "1 of 3 student heads unmatched" in method
    with pytest.raises(CircuitKDError, match="unknown matching 'best'"):
        A.match_heads(sim, method="best")


# ---------------------------------------------------------------------------- CKA

def gram_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA from centred Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    Hc = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, Lg = Hc @ x @ x.T @ Hc, Hc @ y @ y.T @ Hc
    return float((K * Lg).sum() / ((K * K).sum().sqrt() * (Lg * Lg).sum().sqrt()))


def test_linear_cka_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g)
    y = torch.randn(50, 5, generator=g) + x[:, :5] * 0.5
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert A.linear_cka(x, x) == pytest.approx(1.0, abs=1e-6)
    assert A.linear_cka(x, 3.0 * x @ q + 2.0) == pytest.approx(1.0, abs=1e-6)  # orthogonal, scale, shift
    assert A.linear_cka(x, y) == pytest.approx(gram_cka(x, y), abs=1e-6)
    assert A.linear_cka(x @ q, y) == pytest.approx(A.linear_cka(x, y), abs=1e-6)
    # streamed in pieces: the same number
    from circuitkd.attention.similarity import _CKA

    acc = _CKA(1, 1, 8, 5)
    for lo in range(0, 50, 7):
        acc.update([x[lo:lo + 7]], [y[lo:lo + 7]])
    assert float(acc.result()[0, 0]) == pytest.approx(gram_cka(x, y), abs=1e-6)
    with pytest.raises(CircuitKDError, match="same examples"):
        A.linear_cka(x, y[:10])


def test_model_against_itself_cka_one_on_the_diagonal():
    task = nli_like_task(8)
    model = tiny(n_layers=2, n_heads=2)
    diff = A.diff_attention(model, model, task, n=None, confirm="none")
    assert torch.allclose(diff.cka.diagonal(), torch.ones(2), atol=1e-5)
    assert [(s, t) for t, s, _ in diff.matching] == [(h, h) for h in [(0, 0), (0, 1), (1, 0), (1, 1)]]
    read = A.diff_attention(model, model, task, n=None, confirm="none", cka_positions="read")
    assert torch.allclose(read.cka.diagonal(), torch.ones(2), atol=1e-5)


# ---------------------------------------------------------------------------- shortcut heads

def test_vectorised_ablation_matches_one_forward_per_head():
    task = toy_text_task(n_test=24, seq=8)
    model = build_model(ModelSpec.preset("tiny", n_layers=2, n_heads=2), task, device="cpu")
    split = task.ood_test
    means = A.mean_z(model, split.inputs, split.attention_mask, batch_size=7)
    # the means count real positions only
    z = collect(model, split, ["z"])[Site(1, "z")]
    w = split.attention_mask.double()[..., None, None]
    assert torch.allclose(means[1].double(), (z * w).sum(0) / w.sum(0), atol=1e-5)
    fast = A.ablate_heads(model, split.inputs, split.attention_mask, means=means, batch_size=10, rows_per_forward=25)
    assert fast.shape == (1 + 4, 24, 2)
    assert torch.allclose(fast[0], class_logits(model, split.inputs, split.attention_mask), atol=1e-5)
    for layer in range(2):
        for head in range(2):
            def hook(act, *, hook, layer=layer, head=head):
                act = act.clone()
                act[:, :, head] = means[layer][: act.shape[1], head]
                return act

            out = run(model, split, fwd_hooks=[(hook_name(model, Site(layer, "z")), hook)]).logits[:, 0]
            assert torch.allclose(fast[1 + layer * 2 + head], out, atol=1e-5), (layer, head)


def test_shortcut_heads_rank_by_attention_and_confirm_by_ablation():
    task = toy_text_task(n_test=32, seq=8)
    for sp in task.splits.values():
        sp.token_classes = {"token": torch.zeros_like(sp.inputs, dtype=torch.bool).index_fill_(1, torch.tensor([1]), True)}
    model = build_model(ModelSpec.preset("tiny", n_layers=2, n_heads=2), task, device="cpu")
    res = A.shortcut_heads(model, task, n=None, min_effect=0.0, confirm="ablation")
    atts = [r[2] for r in res.ranking]
    assert atts == sorted(atts, reverse=True) and len(res.ranking) == 4
    assert res.n_conflicting == 32 and res.patching is None
    assert len(res.heads) == 4  # min_effect=0 confirms every head
    strict = A.shortcut_heads(model, task, n=None, min_effect=1e9, confirm="ablation")
    assert strict.heads == []
    top2 = A.shortcut_heads(model, task, n=None, min_effect=0.0, k=2, confirm="ablation")
    assert top2.heads == [(r[0], r[1]) for r in res.ranking[:2]]  # only high-attention heads are candidates
    assert any("0." in line or "1." in line for line in res.summary())
    json.dumps(res.to_dict())


def test_shortcut_heads_confirmed_by_the_patching_engine():
    task = toy_text_task(n_test=16, seq=8)
    for sp in task.splits.values():
        sp.token_classes = {"token": torch.zeros_like(sp.inputs, dtype=torch.bool).index_fill_(1, torch.tensor([1]), True)}
    from circuitkd.types import PromptPairs

    clean = task.ood_test.inputs
    corrupt = clean.clone()
    corrupt[:, 1] = 13 - corrupt[:, 1]  # swap shortcut tokens 6 <-> 7
    pairs = PromptPairs(clean=clean, corrupt=corrupt, clean_answer=task.ood_test.labels,
                        corrupt_answer=task.ood_test.labels, attention_mask=task.ood_test.attention_mask)
    model = build_model(ModelSpec.preset("tiny", n_layers=1, n_heads=2), task, device="cpu")
    res = A.shortcut_heads(model, task, n=None, pairs=pairs, confirm="patching")
    assert res.patching is not None and res.patching.shape == (1, 2) and torch.isfinite(res.patching).all()
    from circuitkd.patching import patch

    torch.testing.assert_close(res.patching, patch(model, pairs, "head", metric="kl"))  # the default metric
    # any metric of patch's vocabulary: with answers that differ, the logit difference
    contrast = PromptPairs(clean=clean, corrupt=corrupt, clean_answer=task.ood_test.labels,
                           corrupt_answer=1 - task.ood_test.labels, attention_mask=task.ood_test.attention_mask)
    res = A.shortcut_heads(model, task, n=None, pairs=contrast, confirm="patching", metric="logit_diff")
    torch.testing.assert_close(res.patching, patch(model, contrast, "head", metric="logit_diff"))


# ---------------------------------------------------------------------------- diff, backbones, errors

def test_diff_of_models_of_different_depth_width_and_head_count():
    task = nli_like_task(10)
    teacher = tiny(n_layers=2, n_heads=4, d_model=32)
    student = tiny(n_layers=1, n_heads=2, d_model=16, seed=1)
    diff = A.diff_attention(teacher, student, task, n=None, batch_size=4)
    assert diff.cka.shape == (1, 2) and diff.similarity.shape == (8, 2)
    assert diff.matching_method == "hungarian (one-to-one, 6 of 8 teacher heads unmatched)"
    assert len(diff.matching) == 2 and diff.shortcut_change.shape == (2,)
    (tl, th), (sl, sh), _ = diff.matching[0]
    expected = diff.student.from_read["shortcut"][sl, sh] - diff.teacher.from_read["shortcut"][tl, th]
    assert float(diff.shortcut_change[0]) == pytest.approx(float(expected), abs=1e-6)
    assert 0 <= float(diff.js.min()) and float(diff.js.max()) <= math.log(2) + 1e-6
    lines = diff.summary()
    assert any("teacher top shortcut heads" in line and "." in line for line in lines)
    assert any("student higher" in line or "student lower" in line or "student equal" in line for line in lines)
    assert diff.teacher_heads is not None and diff.student_heads is not None
    data = json.loads(diff.to_json())
    assert data["matching"][0]["student"] == f"{sl}.{sh}" and data["example"]["length"] >= 2
    assert diff.example.teacher.shape[:2] == (2, 4) and diff.example.student.shape[:2] == (1, 2)
    assert all(0 <= p < diff.example.length for p in diff.example.shortcut_positions)
    assert diff.example.image is None and diff.example.read_position == 0
    assert set(diff.example.shortcut_classes) == set(diff.shortcut)
    assert sorted(p for ps in diff.example.shortcut_classes.values() for p in ps) == diff.example.shortcut_positions
    greedy = A.diff_attention(teacher, student, task, n=None, matching="greedy", similarity="corr", confirm="none")
    assert greedy.matching_method.startswith("greedy") and greedy.similarity_kind == "corr"


def test_diff_for_bert_and_vit_bridges():
    task = nli_like_task(6)
    bert = tiny("bert")
    native = tiny(n_layers=1, n_heads=2)
    diff = A.diff_attention(bert, native, task, n=None, confirm="none")
    assert diff.teacher.backbone == "bert" and diff.cka.shape == (1, 1)
    split = colored_split()
    vt = build_model(ModelSpec.preset("vit-student", n_classes=2, d_model=32, n_layers=2), device="cpu")
    vs = build_model(ModelSpec.preset("vit-student", n_classes=2, d_model=16, n_layers=1, n_heads=2), device="cpu")
    diff = A.diff_attention(vt, vs, split, n=None, batch_size=4)
    assert diff.similarity.shape == (8, 2) and diff.cka.shape == (1, 2)
    assert diff.example.labels[0] == "CLS" and diff.example.length == 17
    ex = diff.example  # carries the picture, for the attention-over-the-image figure
    assert torch.equal(ex.image, split.inputs[ex.index]) and ex.read_position == 0
    assert ex.shortcut_classes["colored"] == ex.shortcut_positions and {3, 7} <= set(ex.shortcut_positions)
    assert ex.readout_mass("student", (0, 1)) == pytest.approx(float(ex.student[0, 1, 0, ex.shortcut_positions].sum()))


def test_errors_name_the_problem():
    task = nli_like_task(6)
    model = tiny(n_layers=1, n_heads=2)
    with pytest.raises(CircuitKDError, match=r"unknown token class 'cues'; this split marks \['cls', 'hypothesis'"):
        A.attention_stats(model, task, shortcut="cues")
    other = build_model(ModelSpec.preset("tiny", d_vocab=VOCAB + 5, n_ctx=SEQ, n_classes=3), device="cpu")
    with pytest.raises(CircuitKDError, match="different vocabularies: 24 vs 29"):
        A.diff_attention(model, other, task, confirm="none")
    two = build_model(ModelSpec.preset("tiny", d_vocab=VOCAB, n_ctx=SEQ, n_classes=2), device="cpu")
    with pytest.raises(CircuitKDError, match="2 classes but task 'nli-like' has 3"):
        A.diff_attention(model, two, task, confirm="none")
    small = build_model(ModelSpec.preset("tiny", d_vocab=12, n_ctx=SEQ, n_classes=3), device="cpu")
    with pytest.raises(CircuitKDError, match="vocabulary of 12 tokens"):
        A.attention_stats(small, task)
    vit = build_model(ModelSpec.preset("vit-student", n_classes=3, d_model=16, n_layers=1, n_heads=2), device="cpu")
    with pytest.raises(CircuitKDError, match="cannot read this split's inputs"):
        A.attention_stats(vit, task)
    with pytest.raises(CircuitKDError, match="unknown similarity"):
        A.diff_attention(model, model, task, similarity="cosine")
    with pytest.raises(CircuitKDError, match="has no split 'dev'"):
        A.attention_stats(model, task, split="dev")
    with pytest.raises(CircuitKDError, match="source must be"):
        A.attention_stats(model, task).shortcut_attention(source="cls")
