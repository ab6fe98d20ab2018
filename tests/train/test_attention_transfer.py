"""Attention-transfer KD on matched heads (fix 4): the loss, its gradient, matchings, the circuit variant, bad input."""
import importlib
import math

import pytest
import torch

import circuitkd as ckd
from circuitkd.circuits import Circuit
from circuitkd.config import ModelSpec, TrainCfg
from circuitkd.errors import CircuitKDError
from circuitkd.models.checkpoint import full_state_dict, load_full_state_dict
from circuitkd.native import patterns_native
from circuitkd.train.attention_transfer import (
    AttentionLoss, AttentionTransfer, attention_transfer_loss, circuit_heads, depth_matching, plan_transfer,
)
from circuitkd.train.loop import make_batch
from tests.train.toy import toy_task

distill_mod = importlib.import_module("circuitkd.train.distill")

TEACHER = ModelSpec(n_layers=2, d_model=32, n_heads=2)
STUDENT = ModelSpec(n_layers=2, d_model=32, n_heads=2, seed=1)
CFG = TrainCfg(steps=30, batch_size=32, lr=3e-3, progress=False)


@pytest.fixture(scope="module")
def task():
    return toy_task(0, n_train=256, n_test=64)


@pytest.fixture(scope="module")
def teacher(task):
    torch.set_num_threads(1)
    return ckd.train_model(TEACHER, task, seed=0, cfg=CFG.replace(steps=60), device="cpu")


def _batch(task, n=16):
    return make_batch(task.train, torch.arange(n), torch.device("cpu"))


def _mean_kl(teacher, student, task, pairs, positions="all"):
    """Slow reference: the attention KL of matched heads over real rows, example by example."""
    total, count = 0.0, 0
    split = task.train
    with torch.no_grad():
        for i in range(64):
            length = int(split.attention_mask[i].sum())
            x = split.inputs[i:i + 1, :length]
            _, pt = patterns_native(teacher, x)
            _, ps = patterns_native(student, x)
            for sl, sh, tl, th in pairs:
                rows = range(length) if positions == "all" else [0]
                for q in rows:
                    t, s = pt[0, tl, th, q], ps[0, sl, sh, q]
                    total += float((t * (t.log() - s.log())).sum())
                    count += 1
    return total / count


def test_loss_hand_value():
    # One example, two pairs, three positions; the last position is padding (row weight 0, zero column).
    s = torch.tensor([[[[0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.5, 0.5, 0.0]],
                       [[0.9, 0.1, 0.0], [0.3, 0.7, 0.0], [0.1, 0.9, 0.0]]]])
    t = torch.tensor([[[[0.25, 0.75, 0.0], [0.2, 0.8, 0.0], [0.9, 0.1, 0.0]],
                       [[0.6, 0.4, 0.0], [0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]]])
    rows = torch.tensor([[1.0, 1.0, 0.0]])

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)

    expected = sum(kl(t[0, n, r].tolist(), s[0, n, r].tolist()) for n in range(2) for r in range(2)) / 4
    assert attention_transfer_loss(s, t, rows).item() == pytest.approx(expected, rel=1e-5)
    # The read-out row only: one row per pair.
    expected_read = sum(kl(t[0, n, 0].tolist(), s[0, n, 0].tolist()) for n in range(2)) / 2
    got_read = attention_transfer_loss(s[:, :, :1], t[:, :, :1], rows[:, :1]).item()
    assert got_read == pytest.approx(expected_read, rel=1e-5)


def test_patterns_native_match_hook_patterns(task, teacher):
    x, m = task.train.inputs[:6], task.train.attention_mask[:6]
    logits, patterns = patterns_native(teacher, x, m)
    _, cache = teacher.run_with_cache(x, attention_mask=m)
    ref = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(2)], dim=1)
    assert patterns.shape == (6, 2, 2, x.shape[1], x.shape[1])
    torch.testing.assert_close(patterns, ref, atol=1e-5, rtol=1e-5)
    from circuitkd.models.build import forward_logits, select_class_logits  # the hooked bridge forward

    torch.testing.assert_close(logits, select_class_logits(teacher, forward_logits(teacher, x, m), m),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["all", "read"])
def test_loss_matches_slow_reference_and_is_zero_for_equal_patterns(task, teacher, positions):
    student = ckd.build_model(STUDENT, task, device="cpu")
    plan = plan_transfer(AttentionTransfer(positions=positions), teacher, student, task)
    assert plan.pairs == [(0, 0, 0, 0), (0, 1, 0, 1), (1, 0, 1, 0), (1, 1, 1, 1)]
    sub = task.train.subset(torch.arange(64))
    cached = AttentionLoss(plan, teacher, sub, "cpu")
    per_batch = AttentionLoss(plan, teacher, sub, "cpu", max_cache_bytes=0)
    assert cached.cache is not None and per_batch.cache is None
    batch = make_batch(sub, torch.arange(64), torch.device("cpu"))
    with torch.no_grad():
        _, ps = patterns_native(student, batch.inputs, batch.attention_mask)
        got, got_per_batch = cached(student, batch, ps), per_batch(student, batch, ps)
    assert got.item() > 1e-3
    # Rows are averaged over all real rows of the batch (not per example), so compare on
    # "read" (one row per example) exactly and on "all" within a loose tolerance.
    ref = _mean_kl(teacher, student, task, plan.pairs, positions)
    assert got.item() == pytest.approx(ref, rel=1e-4 if positions == "read" else 0.1)
    assert got_per_batch.item() == pytest.approx(got.item(), rel=1e-5)
    # A student with the teacher's weights has the teacher's patterns: zero loss.
    twin = ckd.build_model(STUDENT, task, device="cpu")
    load_full_state_dict(twin, full_state_dict(teacher))
    with torch.no_grad():
        _, pt = patterns_native(twin, batch.inputs, batch.attention_mask)
        assert cached(twin, batch, pt).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_reaches_only_the_named_heads(task, teacher):
    student = ckd.build_model(STUDENT, task, device="cpu")
    plan = plan_transfer(AttentionTransfer(student_heads=[(1, 0)]), teacher, student, task)
    assert plan.pairs == [(1, 0, 1, 0)]
    loss_fn = AttentionLoss(plan, teacher, task.train, "cpu")
    batch = _batch(task)
    _, ps = patterns_native(student, batch.inputs, batch.attention_mask)
    (grad,) = torch.autograd.grad(loss_fn(student, batch, ps), ps)
    per_head = grad.abs().sum((0, 3, 4))  # [layer head]
    assert per_head[1, 0] > 0
    assert per_head[0].sum() == 0 and per_head[1, 1] == 0
    # In the parameters: layer 1's query/key weights move only for head 0.
    student.zero_grad()
    _, ps = patterns_native(student, batch.inputs, batch.attention_mask)
    loss_fn(student, batch, ps).backward()
    d_head = 16
    for name in ("q", "k"):
        w = getattr(student.blocks[1].attn, name).original_component.weight.grad
        assert w[:d_head].abs().sum() > 0, name
        assert w[d_head:].abs().sum() == 0, name
    # Teacher-side restriction: only the student head matched to teacher head 0.1.
    plan = plan_transfer(AttentionTransfer(teacher_heads=[(0, 1)]), teacher, student, task)
    assert [(sl, sh) for sl, sh, _, _ in plan.pairs] == [(0, 1)]


def test_student_with_another_head_count_through_a_matching(task, teacher):
    # depth: a 1-layer, 4-head student takes every teacher head, layers in order.
    assert depth_matching((2, 2), (1, 4), [(0, 0), (0, 1), (1, 0), (1, 1)]) == [
        (0, 0, 0, 0), (0, 1, 1, 0), (0, 2, 0, 1), (0, 3, 1, 1)]
    wide = ModelSpec(n_layers=1, d_model=32, n_heads=4)
    student = ckd.distill(teacher, wide, task, alpha=0.0, seed=0, cfg=CFG.replace(steps=5),
                          attention_transfer=AttentionTransfer())
    assert len(student.circuitkd_train["kd"]["attention_transfer"]["pairs"]) == 4
    # An explicit matching (the shape diff_attention's has, teacher first): teacher 1.1 -> student 0.3, 0.0 -> 0.0.
    matching = [((1, 1), (0, 3), 0.9), ((0, 0), (0, 0), 0.5)]
    student = ckd.build_model(wide, task, device="cpu")
    plan = plan_transfer(AttentionTransfer(matching=matching), teacher, student, task)
    assert plan.pairs == [(0, 0, 0, 0), (0, 3, 1, 1)]
    loss_fn = AttentionLoss(plan, teacher, task.train, "cpu")
    batch = _batch(task)
    _, ps = patterns_native(student, batch.inputs, batch.attention_mask)
    assert ps.shape[2] == 4 and torch.isfinite(loss_fn(student, batch, ps))


def test_diff_attention_matching_is_accepted():
    task = ckd.data.synthetic_nli(seed=0, n_train=200, n_id=64, n_ood=64)
    teacher = ckd.build_model(ModelSpec.preset("tiny", n_layers=2), task, device="cpu")
    student = ckd.build_model(ModelSpec.preset("tiny", n_heads=4), task, device="cpu")
    diff = ckd.diff_attention(teacher, student, task, n=32, confirm="none")
    plan = plan_transfer(AttentionTransfer(matching=diff), teacher, student, task)
    assert plan.pairs == sorted((*s, *t) for t, s, _ in diff.matching)
    # The JSON form of the same matching also works.
    plan2 = plan_transfer(AttentionTransfer(matching=diff.to_dict()["matching"]), teacher, student, task)
    assert plan2.pairs == plan.pairs


def test_the_fix_changes_what_is_trained(task, teacher):
    kw = dict(alpha=0.0, seed=0, cfg=CFG)
    plain = ckd.distill(teacher, STUDENT, task, **kw)
    fixed = ckd.distill(teacher, STUDENT, task, attention_transfer=AttentionTransfer(coef=3.0), **kw)
    zero = ckd.distill(teacher, STUDENT, task, attention_transfer={"coef": 0.0}, **kw)
    w_plain, w_fixed, w_zero = (full_state_dict(m) for m in (plain, fixed, zero))
    assert any(not torch.equal(w_plain[k], w_fixed[k]) for k in w_plain)
    for k in w_plain:  # coefficient 0 trains exactly what plain KD trains
        if ".k." in k and k.endswith("bias"):
            # A key bias adds the same score to every key of a query, which the softmax cancels: its
            # gradient is zero up to rounding, and Adam scales that rounding up to full-size steps,
            # differently for the two forwards (the patterns forward runs the last layer at every row).
            continue
        torch.testing.assert_close(w_zero[k], w_plain[k], atol=1e-5, rtol=1e-5)
    pairs = [(l, h, l, h) for l in range(2) for h in range(2)]
    assert _mean_kl(teacher, fixed, task, pairs) < 0.5 * _mean_kl(teacher, plain, task, pairs)
    assert fixed.circuitkd_train["kd"]["attention_transfer"]["coef"] == 3.0
    assert plain.circuitkd_train["kd"]["attention_transfer"] is None


def test_circuit_guided_variant_restricts_to_the_circuits_heads():
    task = ckd.data.synthetic_nli(seed=0, n_train=200, n_id=64, n_ood=64)
    teacher = ckd.build_model(ModelSpec.preset("tiny", n_layers=2), task, device="cpu")
    pairs = task.shortcut_pairs(n=32)
    circuit = ckd.discover(teacher, pairs, method="eap-ig", top_k=4)
    heads = circuit_heads(circuit, 4)
    student_spec = ModelSpec.preset("tiny", n_layers=1)
    student = ckd.build_model(student_spec, task, device="cpu")
    assert heads, "the tiny teacher's top-4 edges should touch a head"
    plan = plan_transfer(AttentionTransfer(circuit=circuit.top_k(4)), teacher, student, task)
    assert set(plan.teacher_heads) <= set(heads) and set(plan.circuit_heads) == set(heads)
    with pytest.raises(CircuitKDError, match="circuit has no attention heads"):
        plan_transfer(AttentionTransfer(circuit=circuit.top_k(0)), teacher, student, task)
    # Another model's circuit: every edge of the 2-layer teacher's graph names layer-1 heads.
    whole = Circuit(circuit.graph, circuit.scores)
    one_layer = ckd.build_model(ModelSpec.preset("tiny"), task, device="cpu")
    with pytest.raises(CircuitKDError, match="names head 1.0, which the teacher does not have"):
        plan_transfer(AttentionTransfer(circuit=whole), one_layer, student, task)
    trained = ckd.distill(teacher, student_spec, task, alpha=0.0, cfg=CFG.replace(steps=3),
                          attention_transfer=AttentionTransfer(circuit=8, circuit_pairs=32))
    info = trained.circuitkd_train["kd"]["attention_transfer"]
    on_circuit = set(info["circuit_heads"])
    assert info["circuit"]["top_k"] == 8 and on_circuit
    assert {p["teacher"] for p in info["pairs"]} <= on_circuit


@pytest.fixture
def no_training(monkeypatch):
    """Fail if training starts: every bad input must be refused before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(distill_mod, "train_loop", refuse)


@pytest.mark.parametrize("coef", [-0.1, float("nan"), float("inf"), True, "1"])
def test_bad_coefficient(task, teacher, no_training, coef):
    with pytest.raises(CircuitKDError, match="coef"):
        ckd.distill(teacher, STUDENT, task, cfg=CFG, attention_transfer={"coef": coef})


@pytest.mark.parametrize("at, match", [
    (dict(matching=[((0, 0), (0, 2))]), "0.2, which the student does not have"),
    (dict(matching=[((0, 0), (2, 0))]), "2.0, which the student does not have"),
    (dict(matching=[((5, 0), (0, 0))]), "5.0, which the teacher does not have"),
    (dict(student_heads=[(0, 7)]), "0.7, which the student does not have"),
    (dict(teacher_heads=[(3, 0)]), "3.0, which the teacher does not have"),
    (dict(matching=[((0, 0), (0, 0))], student_heads=[(1, 1)]), "nothing to transfer"),
    (dict(positions="cls"), "positions"),
    (dict(matching="greedy"), "matching"),
    (dict(matching=[(0, 0)]), "pair"),
    (dict(teacher_heads=[(-1, 0)]), "non-negative"),
    (dict(circuit=0), "circuit"),
    (dict(bogus=1), "bogus"),
])
def test_bad_matching_and_heads(task, teacher, no_training, at, match):
    with pytest.raises(CircuitKDError, match=match):
        ckd.distill(teacher, STUDENT, task, cfg=CFG, attention_transfer=at)


def test_backbones_without_trainable_patterns(task, teacher, no_training):
    bert = ModelSpec(backbone="bert", n_layers=1, d_model=32, n_heads=2)
    with pytest.raises(CircuitKDError, match="backbone 'bert'"):
        ckd.distill(teacher, bert, task, cfg=CFG, attention_transfer=True)
    bert_teacher = ckd.build_model(bert, task, device="cpu")
    with pytest.raises(CircuitKDError, match="teacher is a 'bert' model"):
        ckd.distill(bert_teacher, STUDENT, task, cfg=CFG, attention_transfer=True)
    with pytest.raises(CircuitKDError, match="via"):
        ckd.distill(teacher, STUDENT, task, cfg=CFG, via=[TEACHER],
                    attention_transfer=AttentionTransfer(student_heads=[(0, 0)]))


def test_every_stage_of_iterative_kd_gets_the_transfer(task, teacher):
    student = ckd.distill(teacher, ModelSpec(n_layers=1, d_model=32, n_heads=2), task, alpha=0.0,
                          cfg=CFG.replace(steps=3), via=[ModelSpec(n_layers=2, d_model=32, n_heads=4)],
                          attention_transfer=AttentionTransfer(positions="read"))
    at = student.circuitkd_train["kd"]["attention_transfer"]
    # The last stage's teacher is the 4-head assistant: the student's two heads match two of its heads.
    assert at["positions"] == "read" and len(at["pairs"]) == 2
    assert {p["teacher"] for p in at["pairs"]} <= {f"0.{h}" for h in range(4)}
