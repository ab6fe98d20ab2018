"""The KD fixes do what they say, observed in what the student is actually trained on.

``train_loop`` and ``kd_loss`` are wrapped (not replaced) to record every training split, batch
and soft target; the expected targets are computed here by running the teacher or assistant
bridge directly. Each test fails if its fix silently turns into plain KD: augmentation rows
missing from the batches, assistant stages distilled from the teacher, a student left at its
random initialisation or initialised from other layers.
"""
from __future__ import annotations

import sys

import pytest
import torch

import circuitkd as ckd
from circuitkd.config import ModelSpec, TrainCfg
from tests.train.toy import toy_task

torch.set_num_threads(1)

CFG = TrainCfg(steps=4, batch_size=32, lr=3e-3, progress=False)
SPEC = dict(d_model=32, n_heads=2)


@pytest.fixture(scope="module")
def task():
    return toy_task(0, n_train=200, n_test=40)


@pytest.fixture
def record(monkeypatch):
    """Wrap distill's train_loop and kd_loss; return the list of stages they saw."""
    mod = sys.modules["circuitkd.train.distill"]
    real_loop, real_kd = mod.train_loop, mod.kd_loss
    stages: list[dict] = []

    def train_loop(model, split, cfg, *, loss_fn, **kw):
        stage = {"model": model, "split": split, "batches": [], "targets": [],
                 "initial_state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        stages.append(stage)

        def recording_loss(m, batch, step):
            stage["batches"].append(batch)
            return loss_fn(m, batch, step)

        return real_loop(model, split, cfg, loss_fn=recording_loss, **kw)

    def kd_loss(student_logits, teacher_logits, temperature):
        stages[-1]["targets"].append(teacher_logits.detach().clone())
        return real_kd(student_logits, teacher_logits, temperature)

    monkeypatch.setattr(mod, "train_loop", train_loop)
    monkeypatch.setattr(mod, "kd_loss", kd_loss)
    return stages


def _class_logits(model, inputs, mask):
    """The bridge's own forward, read at the CLS position."""
    with torch.no_grad():
        out = model(inputs, attention_mask=mask)
    return out[:, 0] if out.dim() == 3 else out


def _teacher(task, n_layers=2, seed=1):
    torch.manual_seed(seed)
    return ckd.build_model(ModelSpec(n_layers=n_layers, seed=seed, **SPEC), task, device="cpu")


def test_augmentation_examples_reach_the_batches_with_the_teachers_soft_labels(task, record):
    teacher = _teacher(task)
    extra = toy_task(7, n_train=100, n_test=8).train
    ckd.distill(teacher, ModelSpec(n_layers=1, **SPEC), task, augment=extra, alpha=0.5, seed=0, cfg=CFG)
    (stage,) = record
    n = len(task.train)
    assert len(stage["split"]) == n + len(extra)
    seen_extra = 0
    for batch, target in zip(stage["batches"], stage["targets"]):
        idx = batch.index
        aug = idx >= n
        seen_extra += int(aug.sum())
        # the rows are the augmentation examples themselves, and the targets the teacher's logits on them
        w = batch.inputs.shape[1]  # batches may be cut to their longest real sequence
        torch.testing.assert_close(batch.inputs[aug], extra.inputs[idx[aug] - n, :w])
        torch.testing.assert_close(batch.inputs[~aug], task.train.inputs[idx[~aug], :w])
        assert not extra.attention_mask[idx[aug] - n, w:].any()
        torch.testing.assert_close(target, _class_logits(teacher, batch.inputs, batch.attention_mask),
                                   atol=1e-5, rtol=1e-5)
    assert len(stage["targets"]) == CFG.steps and seen_extra > 0


def test_iterative_kd_soft_targets_are_the_assistants_logits(task, record):
    teacher = _teacher(task, n_layers=3)
    ckd.distill(teacher, ModelSpec(n_layers=1, **SPEC), task, via=[ModelSpec(n_layers=2, **SPEC)], alpha=0.0,
                seed=0, cfg=CFG)
    assert len(record) == 2
    assistant, final = record
    assert len(assistant["model"].blocks) == 2 and len(final["model"].blocks) == 1
    for batch, target in zip(assistant["batches"], assistant["targets"]):
        torch.testing.assert_close(target, _class_logits(teacher, batch.inputs, batch.attention_mask),
                                   atol=1e-5, rtol=1e-5)
    gap = 0.0
    for batch, target in zip(final["batches"], final["targets"]):
        expected = _class_logits(assistant["model"], batch.inputs, batch.attention_mask)
        torch.testing.assert_close(target, expected, atol=1e-5, rtol=1e-5)
        gap = max(gap, float((target - _class_logits(teacher, batch.inputs, batch.attention_mask)).abs().max()))
    assert len(final["targets"]) == CFG.steps
    assert gap > 1e-2  # the assistant's targets are not the teacher's: plain KD could not pass


def test_teacher_initialisation_copies_exactly_the_layers_it_names(task, record):
    teacher = _teacher(task, n_layers=4)
    student = ckd.distill(teacher, ModelSpec(n_layers=2, **SPEC), task, init_from_teacher=True, seed=0, cfg=CFG)
    assert student.circuitkd_train["kd"]["layer_map"] == [0, 2]
    (stage,) = record
    t_state, s_state = teacher.state_dict(), stage["initial_state"]
    n_block = 0
    for key, value in s_state.items():
        if key.startswith("blocks."):
            layer, rest = key.split(".", 2)[1:]
            named = {"0": "0", "1": "2"}[layer]  # every other teacher layer, by hand
            assert torch.equal(value, t_state[f"blocks.{named}.{rest}"]), key
            other = {"0": "1", "1": "3"}[layer]
            if value.numel() > 1 and value.std() > 0:
                assert not torch.equal(value, t_state[f"blocks.{other}.{rest}"]), key
            n_block += 1
        else:
            assert torch.equal(value, t_state[key]), key
    assert n_block > 0
