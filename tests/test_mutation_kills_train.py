"""Tests written for mutants of circuitkd/train/debias.py and distill.py that the suite let live.

Each test names the mutants it kills (docs/testing.md lists them with tools/mutation.py's names):
a behaviour the other tests never looked at — which seed and split the unknown bias model
trains on, the name an objective saves itself under, the teacher confreg is handed, the
checks of a damaged saved state. All run on the 2-class toy task with a tiny model.
"""
import importlib
import json
from pathlib import Path

import pytest
import torch

from circuitkd.config import DebiasCfg, ModelSpec, TrainCfg
from circuitkd.errors import CircuitKDError
from circuitkd.evaluate import predict_logits
from circuitkd.models import build_model
from circuitkd.models.build import model_device, spec_of
from circuitkd.train import debias
from circuitkd.train.bias_models import bias_probs
from circuitkd.train.loop import Batch
from tests.train.toy import ToyTokenizer
from tests.train.toy import toy_task as toy_train_task

SPEC = ModelSpec.preset("tiny")
CFG = TrainCfg(steps=2, batch_size=16, progress=False, checkpoint_every=0)
UNKNOWN = {"unknown_examples": 64, "unknown_steps": 3}


def _batch(split, idx):
    return Batch(inputs=split.inputs[idx], labels=split.labels[idx], index=idx, groups=split.groups[idx],
                 attention_mask=split.attention_mask[idx])


@pytest.fixture
def model(toy_task):
    return build_model(SPEC.replace(seed=0), toy_task)


@pytest.mark.parametrize("method", ["poe:unknown", "learned_mixin_h:unknown"])
def test_the_unknown_bias_model_trains_with_the_objectives_seed_on_its_split(toy_task, model, method):
    """Kills: _bias_probs dropping ``seed`` or ``split``; _build_lmh / _bias_product passing no seed."""
    split = toy_task.train.subset(torch.arange(40, 140))
    loss_fn, _ = debias.make_objective(method, toy_task, model, cfg=CFG, seed=3, split=split, options=UNKNOWN)
    expected = bias_probs(toy_task, "unknown", spec=spec_of(model), split=split, seed=3, cfg=CFG,
                          device=model_device(model), **UNKNOWN)
    other_seed = bias_probs(toy_task, "unknown", spec=spec_of(model), split=split, seed=0, cfg=CFG,
                            device=model_device(model), **UNKNOWN)
    assert not torch.allclose(expected, other_seed)  # the seed matters, so a dropped seed shows
    assert torch.equal(loss_fn.bias_probs, expected)


@pytest.mark.parametrize("method", sorted(debias.METHODS))
def test_every_objective_is_saved_under_its_own_name(toy_task, model, method):
    """Kills: Objective built with another (or no) method name — a resumed run would check against it."""
    loss_fn, _ = debias.make_objective(method, toy_task, model, cfg=CFG, options={"bias": "token"}
                                       if debias.METHODS[method].uses_bias_model else None)
    assert loss_fn.method == method


@pytest.mark.parametrize("method, loss", [("reweight", debias.reweight_loss), ("poe", debias.poe_loss),
                                          ("focal", debias.focal_loss)])
def test_bias_product_objectives_compute_their_loss_on_the_batch(toy_task, model, method, loss):
    """Kills: _bias_product's loss_fn reading another table, dropping the labels or the model, or its options."""
    options = DebiasCfg(bias="token", focal_gamma=3.0)
    loss_fn, _ = debias.make_objective(method, toy_task, model, cfg=CFG, options=options)
    idx = torch.tensor([3, 0, 17, 99, 5])
    batch = _batch(toy_task.train, idx)
    extra = {"gamma": 3.0} if method == "focal" else {}
    expected = loss(batch.logits(model), batch.labels, loss_fn.bias_probs[idx], **extra)
    assert torch.allclose(loss_fn(model, batch, 0), expected)
    assert loss_fn.state_dict()["tables"].keys() == {"bias_probs"}


def test_group_dro_weighs_exactly_the_tasks_groups(toy_task, model):
    """Kills: one group too many in q (its weight would dilute every real group's)."""
    loss_fn, _ = debias.make_objective("group_dro", toy_task, model, cfg=CFG)
    assert torch.equal(loss_fn.state["q"], torch.full((4,), 0.25))


def test_confreg_self_distils_from_the_teacher_it_is_given(toy_task, model):
    """Kills: make_objective not passing ``teacher`` on (confreg would train its own plain model)."""
    teacher = build_model(SPEC.replace(seed=7), toy_task)
    loss_fn, _ = debias.make_objective("confreg", toy_task, model, cfg=CFG, teacher=teacher,
                                       options={"bias": "token"})
    assert torch.allclose(loss_fn.teacher_probs, torch.softmax(predict_logits(teacher, toy_task.train), dim=-1))


def test_unknown_method_error_lists_the_known_ones(toy_task, model):
    with pytest.raises(CircuitKDError, match=r"known methods: none, reweight, poe"):
        debias.make_objective("rewieght", toy_task, model, cfg=CFG)


def test_damaged_or_foreign_saved_state_is_refused_and_dtypes_are_restored(toy_task, model):
    """Kills: load_state_dict's checks raising a KeyError or the wrong message, and restoring state without its dtype."""
    loss_fn, _ = debias.make_objective("group_dro", toy_task, model, cfg=CFG)
    with pytest.raises(CircuitKDError, match=r"damaged \(keys \['method'\]\)"):
        loss_fn.load_state_dict({"method": "group_dro"})
    saved = loss_fn.state_dict()
    short = {**saved, "tables": {"t": torch.zeros(3)}}
    with pytest.raises(CircuitKDError, match="do not cover the 256 training examples of this run"):
        loss_fn.load_state_dict(short)
    with pytest.raises(CircuitKDError, match=r"state holds \['p'\], expected \['q'\]"):
        loss_fn.load_state_dict({**saved, "state": {"p": torch.ones(4)}})
    loss_fn.load_state_dict({**saved, "state": {"q": torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)}})
    assert loss_fn.state["q"].dtype == torch.float32
    assert torch.allclose(loss_fn.state["q"], torch.tensor([0.1, 0.2, 0.3, 0.4]))


# ------------------------------------------------------------------------------ distill.py


def test_a_kd_stage_gives_its_label_loss_the_stage_cfg_and_options(toy_task, monkeypatch):
    """Kills: _distill_stage calling the debiasing objective without cfg, or without split and options."""
    distill_mod = importlib.import_module("circuitkd.train.distill")

    seen = {}
    real = distill_mod.objective

    def spy(name, task, model, **kwargs):
        seen.update(kwargs)
        return real(name, task, model, **kwargs)

    monkeypatch.setattr(distill_mod, "objective", spy)
    teacher = build_model(SPEC.replace(seed=5), toy_task)
    distill_mod.distill(teacher, SPEC, toy_task, debias="group_dro", alpha=0.5, cfg=CFG, seed=4,
                        debias_options={"options": {"dro_eta": 0.5}})
    assert seen["cfg"] == CFG.replace(seed=4)
    assert seen["split"] is toy_task.train and seen["options"] == {"dro_eta": 0.5}


class _SavingTokenizer(ToyTokenizer):
    def save(self, path):
        Path(path).write_text('{"vocab_size": 12}')


def test_a_checkpointed_stage_saves_partial_checkpoints_and_a_complete_final_one(tmp_path):
    """Kills: the ``checkpoint_every == 0`` test inverted (an interrupted stage could not resume); the
    final checkpoint saved without the tokenizer, the task's source or the seed; the partial
    checkpoint folder left behind."""
    distill_mod = importlib.import_module("circuitkd.train.distill")
    from circuitkd.models.checkpoint import CONFIG, TOKENIZER
    from circuitkd.train.train import partial_dir

    task = toy_train_task(0, n_train=64, n_test=32)
    task.tokenizer, task.info["source"] = _SavingTokenizer(), "hand-made"
    teacher = build_model(SPEC.replace(seed=5), task)
    student = distill_mod.distill(teacher, SPEC, task, cfg=CFG, seed=6, checkpoint=tmp_path / "student")
    assert CFG.checkpoint_every == 0 and student.circuitkd_train["train_cfg"]["checkpoint_every"] == 50
    assert student.circuitkd_train["seed"] == 6
    assert (tmp_path / "student" / TOKENIZER).read_text() == '{"vocab_size": 12}'
    assert json.loads((tmp_path / "student" / CONFIG).read_text())["task_source"] == "hand-made"
    assert not partial_dir(tmp_path / "student").exists()
    kept = distill_mod.distill(teacher, SPEC, task, cfg=CFG.replace(checkpoint_every=7), checkpoint=tmp_path / "s2")
    assert kept.circuitkd_train["train_cfg"]["checkpoint_every"] == 7
    # a stage long enough to write partial checkpoints removes them once its final checkpoint is saved
    seen = []
    real_loop = distill_mod.train_loop

    def spy(*args, **kwargs):
        out = real_loop(*args, **kwargs)
        seen.append(Path(kwargs["resume_dir"]).exists())
        return out

    distill_mod.train_loop = spy
    try:
        distill_mod.distill(teacher, SPEC, task, cfg=CFG.replace(checkpoint_every=1), checkpoint=tmp_path / "s3")
    finally:
        distill_mod.train_loop = real_loop
    assert seen == [True] and not partial_dir(tmp_path / "s3").exists()


def test_augmentation_adds_the_examples_it_names_drawn_with_the_seed(monkeypatch):
    """Kills: ``augment=True`` not drawing a quarter of the train size; ``augment=n`` drawn without the seed."""
    distill_mod = importlib.import_module("circuitkd.train.distill")
    splits = []
    real = distill_mod.train_loop

    def spy(model, split, *args, **kwargs):
        splits.append(split)
        return real(model, split, *args, **kwargs)

    monkeypatch.setattr(distill_mod, "train_loop", spy)
    task = toy_train_task(0, n_train=64, n_test=32)
    teacher = build_model(SPEC.replace(seed=5), task)
    for augment, n in ((True, 16), (8, 8)):
        distill_mod.distill(teacher, SPEC, task, augment=augment, cfg=CFG, seed=3)
        assert len(splits[-1]) == 64 + n
        assert torch.equal(splits[-1].inputs[64:], task.augmentation(n, seed=3).inputs)
    assert not torch.equal(task.augmentation(8, seed=3).inputs, task.augmentation(8, seed=0).inputs)


def test_a_teacher_with_another_output_count_is_refused_by_name(toy_task):
    """Kills: the stage's output-count error losing its message."""
    distill_mod = importlib.import_module("circuitkd.train.distill")

    teacher = build_model(SPEC.replace(seed=5, n_classes=3, d_vocab=toy_task.vocab_size,
                                       n_ctx=max(toy_task.seq_len, 8)))
    with pytest.raises(CircuitKDError, match="teacher has 3 outputs but task 'toy' has 2 labels"):
        distill_mod._distill_stage(teacher, SPEC, toy_task, toy_task.train, temperature=2.0, alpha=0.5,
                                   debias="none", init=False, seed=0, cfg=CFG, device="cpu", checkpoint=None,
                                   debias_options=None, desc="stage", info={})


def test_attention_transfer_records_whether_teacher_patterns_were_cached(toy_task):
    """Kills: the ``cached`` flag of the attention-transfer record saved under another key, or inverted."""
    distill_mod = importlib.import_module("circuitkd.train.distill")

    teacher = build_model(SPEC.replace(seed=5), toy_task)
    student = distill_mod.distill(teacher, SPEC, toy_task, cfg=CFG, attention_transfer=True)
    assert student.circuitkd_train["kd"]["attention_transfer"]["cached"] is True  # the toy split fits the cache


def test_memoised_logits_from_the_pattern_forward_are_read_where_the_model_reads(toy_task):
    """Kills: _MemoBatch.patterns reading the class at position 0 (no read positions, or those of no model):
    a causal student reads its last real token, so attention-transfer KD would train the wrong logits."""
    distill_mod = importlib.import_module("circuitkd.train.distill")
    model = build_model(SPEC.replace(seed=1, causal=True), toy_task)
    idx = torch.arange(6)
    batch = _batch(toy_task.train, idx)
    assert (batch.attention_mask.sum(1) < batch.attention_mask.shape[1]).any()  # some rows are padded
    memo = distill_mod._MemoBatch(**{k: getattr(batch, k) for k in ("inputs", "labels", "index", "groups",
                                                                     "attention_mask")})
    patterns = memo.patterns(model)
    assert patterns.shape[:3] == (6, SPEC.n_layers, SPEC.n_heads)
    torch.testing.assert_close(memo.logits(model), batch.logits(model), atol=1e-5, rtol=1e-5)


def test_a_teacher_of_the_other_modality_is_refused_saying_what_it_reads(toy_task):
    """Kills: _check_teacher_fits' message naming the wrong input kind."""
    import copy

    distill_mod = importlib.import_module("circuitkd.train.distill")
    text_teacher = build_model(SPEC.replace(seed=5), toy_task)
    with pytest.raises(CircuitKDError, match=r"'native' teacher \(it reads text\) on the image task 'img'"):
        image_task = copy.copy(toy_task)
        image_task.modality, image_task.name = "image", "img"
        distill_mod._check_teacher_fits(text_teacher, image_task)
    vit = build_model(ModelSpec(backbone="vit", n_layers=1, d_model=16, n_heads=2, n_classes=2, image_size=8,
                                patch_size=4))
    with pytest.raises(CircuitKDError, match=r"'vit' teacher \(it reads images\) on the text task 'toy'"):
        distill_mod._check_teacher_fits(vit, toy_task)
