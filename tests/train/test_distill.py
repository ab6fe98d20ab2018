"""Hinton KD, debiased KD and the three fixes (augmentation, iterative KD, teacher initialisation)."""
import math

import pytest
import torch
import torch.nn.functional as F

import circuitkd as ckd
from circuitkd.config import ModelSpec, TrainCfg
from circuitkd.errors import CircuitKDError
from circuitkd.evaluate import predict_logits
from circuitkd.models.pair import layer_map
from circuitkd.train.distill import init_from_teacher, kd_loss, make_kd_loss
from circuitkd.train.loop import Batch
from tests.train.toy import toy_task

TEACHER = ModelSpec(n_layers=2, d_model=32, n_heads=2)
STUDENT = ModelSpec(n_layers=1, d_model=32, n_heads=2)
CFG = TrainCfg(steps=60, batch_size=32, lr=3e-3, progress=False)


@pytest.fixture(scope="module")
def task():
    return toy_task(0, n_train=600, n_test=200)


@pytest.fixture(scope="module")
def teacher(task):
    torch.set_num_threads(1)
    return ckd.train_model(TEACHER, task, seed=0, cfg=CFG.replace(steps=120), device="cpu")


def test_kd_loss_hand_value():
    s = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    T = 2.0

    def soft(z):
        e = [math.exp(x / T) for x in z]
        return [x / sum(e) for x in e]

    kl = 0.0
    for zs, zt in zip(s.tolist(), t.tolist()):
        ps, pt = soft(zs), soft(zt)
        kl += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert kd_loss(s, t, T).item() == pytest.approx(T * T * kl / 2, rel=1e-6)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_mix_weights(task):
    model = ckd.build_model(STUDENT, task, device="cpu")
    idx = torch.arange(8)
    split = task.train
    batch = Batch(inputs=split.inputs[idx], labels=split.labels[idx], index=idx, groups=split.groups[idx],
                  attention_mask=split.attention_mask[idx])
    teacher_logits = torch.randn(len(split), 2)
    with torch.no_grad():
        logits = batch.logits(model)
        ce = F.cross_entropy(logits, batch.labels).item()
        kd = kd_loss(logits, teacher_logits[idx], 3.0).item()
        for alpha, expected in [(0.0, kd), (1.0, ce), (0.3, 0.3 * ce + 0.7 * kd)]:
            got = make_kd_loss(teacher_logits, temperature=3.0, alpha=alpha)(model, batch, 0).item()
            assert got == pytest.approx(expected, rel=1e-5)
    with pytest.raises(CircuitKDError, match="alpha"):
        make_kd_loss(teacher_logits, temperature=1.0, alpha=1.5)


def test_pure_kd_student_imitates_teacher(task, teacher):
    student = ckd.distill(teacher, STUDENT, task, alpha=0.0, seed=0, cfg=CFG.replace(steps=120))
    t_pred = predict_logits(teacher, task.id_test).argmax(-1)
    s_pred = predict_logits(student, task.id_test).argmax(-1)
    assert (t_pred == s_pred).float().mean() > 0.9
    info = student.circuitkd_train
    assert info["kd"]["alpha"] == 0.0 and info["train_cfg"]["steps"] == 120


def test_layer_map_every_other_layer():
    assert layer_map(4, 2) == [0, 2]
    assert layer_map(12, 6) == [0, 2, 4, 6, 8, 10]
    assert layer_map(3, 3) == [0, 1, 2]
    with pytest.raises(CircuitKDError, match="deeper"):
        layer_map(2, 4)


def test_init_from_teacher_copies_weights(task):
    teacher = ckd.build_model(ModelSpec(n_layers=4, d_model=32, n_heads=2, seed=1), task, device="cpu")
    student = ckd.build_model(ModelSpec(n_layers=2, d_model=32, n_heads=2, seed=2), task, device="cpu")
    assert init_from_teacher(student, teacher) == [0, 2]
    t, s = teacher.state_dict(), student.state_dict()
    for key in s:
        src = key.replace("blocks.1.", "blocks.2.") if key.startswith("blocks.1.") else key
        assert torch.equal(s[key], t[src]), key


def test_init_from_teacher_width_mismatch_names_shapes(task):
    teacher = ckd.build_model(ModelSpec(n_layers=2, d_model=32, n_heads=2), task, device="cpu")
    with pytest.raises(CircuitKDError, match=r"shape \(\d+, 16\).*\(\d+, 32\)"):
        ckd.distill(teacher, ModelSpec(n_layers=1, d_model=16, n_heads=2), task, init_from_teacher=True,
                    cfg=CFG.replace(steps=1))


def test_init_fix_starts_from_teacher(task, teacher):
    # One step at a tiny learning rate: the student still predicts what the teacher's layers do.
    init = ckd.distill(teacher, STUDENT.replace(n_layers=2), task, init_from_teacher=True,
                       cfg=CFG.replace(steps=1, lr=1e-9))
    assert torch.allclose(predict_logits(init, task.id_test), predict_logits(teacher, task.id_test), atol=1e-4)


def test_augmentation_fix_trains_on_more_data(task, teacher, tmp_path):
    student = ckd.distill(teacher, STUDENT, task, augment=100, cfg=CFG.replace(steps=5), checkpoint=tmp_path / "s")
    assert student.circuitkd_train["kd"]["augment"] == 100
    with pytest.raises(CircuitKDError, match="augment"):
        ckd.distill(teacher, STUDENT, task, augment="lots", cfg=CFG.replace(steps=1))


def test_iterative_kd_saves_assistants_and_resumes(task, teacher, tmp_path):
    ckpt = tmp_path / "student"
    assistant = ModelSpec(n_layers=2, d_model=32, n_heads=2)
    student = ckd.distill(teacher, STUDENT, task, via=[assistant], cfg=CFG.replace(steps=10), checkpoint=ckpt)
    assert ckd.models.is_checkpoint(tmp_path / "student.via0") and ckd.models.is_checkpoint(ckpt)
    assert student.circuitkd_train["kd"]["via"][0]["n_layers"] == 2
    again = ckd.distill(teacher, STUDENT, task, via=[assistant], cfg=CFG.replace(steps=10), checkpoint=ckpt)
    assert torch.equal(predict_logits(again, task.id_test), predict_logits(student, task.id_test))


def test_debiased_kd_uses_debias_loss(task, teacher):
    plain = ckd.distill(teacher, STUDENT, task, alpha=0.5, seed=0, cfg=CFG.replace(steps=5))
    poe = ckd.distill(teacher, STUDENT, task, alpha=0.5, debias="poe", seed=0, cfg=CFG.replace(steps=5))
    assert poe.circuitkd_train["kd"]["debias"] == "poe"
    assert not torch.equal(predict_logits(plain, task.id_test), predict_logits(poe, task.id_test))
    with pytest.raises(CircuitKDError, match="unknown debiasing method"):
        ckd.distill(teacher, STUDENT, task, debias="nope", cfg=CFG.replace(steps=1))


@pytest.mark.parametrize("backbone", ["bert", "vit"])
def test_init_from_teacher_hf_backbones(backbone):
    from circuitkd.models.checkpoint import full_state_dict

    kw = dict(backbone=backbone, d_model=32, n_heads=2, n_classes=2, d_vocab=20, n_ctx=12, image_size=14, patch_size=7)
    teacher = ckd.build_model(ModelSpec(n_layers=4, seed=1, **kw), device="cpu")
    student = ckd.build_model(ModelSpec(n_layers=2, seed=2, **kw), device="cpu")
    init_from_teacher(student, teacher)
    t, s = full_state_dict(teacher), full_state_dict(student)
    layer = "layer" if backbone == "bert" else "layers"
    for key in s:
        src = key.replace(f"{layer}.1.", f"{layer}.2.")
        assert torch.equal(s[key], t[src]), key
