"""Issue 16, item 4: an interrupted run of every debiasing method resumes bit for bit.

Each method trains a tiny model straight through, and again with an interruption after a
partial checkpoint; the resumed run must end with the same weights (``torch.equal``), the
same learned-mixin gate and the same Group DRO weights, and must not rebuild what the
partial checkpoint holds (bias-only probabilities, confreg's plain teacher, JTT's error set).
"""
import importlib

import pytest
import torch

import circuitkd.train.debias as debias
from circuitkd.config import ModelSpec, TrainCfg
from circuitkd.errors import CircuitKDError
from circuitkd.models import build_model
from circuitkd.train import distill, train_loop
from circuitkd.train.loop import cross_entropy_loss
from circuitkd.train.train import objective, partial_dir

SPEC = ModelSpec.preset("tiny")
# Interrupted at step 7, after the checkpoint of step 6 (checkpoint_every=3): steps 6 and 7 are redone.
CFG = TrainCfg(steps=10, batch_size=16, lr=3e-3, checkpoint_every=3, progress=False)
STOP_AT = 7


class Stop(Exception):
    pass


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _interrupting(loss_fn):
    """``loss_fn``, raising :class:`Stop` at step ``STOP_AT``; its state is found through ``wraps``."""
    def loss(model, batch, step):
        if step == STOP_AT:
            raise Stop
        return loss_fn(model, batch, step)

    loss.wraps = (loss_fn,)
    return loss


def _no_rebuild(monkeypatch):
    """Make recomputing a method's per-example tables an error: a resumed run must load them."""
    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run rebuilt state its partial checkpoint holds")

    monkeypatch.setattr(debias, "_bias_probs", refuse)
    monkeypatch.setattr(debias, "jtt_error_set", refuse)


def _straight_and_resumed(task, method, tmp_path, monkeypatch):
    """Train ``method`` uninterrupted, then interrupted and resumed; returns both models and objectives."""
    straight = build_model(SPEC.replace(seed=0), task)
    straight_loss, straight_extra = objective(method, task, straight, cfg=CFG, seed=0)
    train_loop(straight, task.train, CFG, loss_fn=straight_loss, params=list(straight.parameters()) + straight_extra)

    ckpt = tmp_path / method
    model = build_model(SPEC.replace(seed=0), task)
    loss_fn, extra = objective(method, task, model, cfg=CFG, seed=0)
    with pytest.raises(Stop):
        train_loop(model, task.train, CFG, loss_fn=_interrupting(loss_fn), resume_dir=partial_dir(ckpt),
                   params=list(model.parameters()) + extra)

    resumed = build_model(SPEC.replace(seed=0), task)
    resumed_loss, resumed_extra = objective(method, task, resumed, cfg=CFG, seed=0)
    with monkeypatch.context() as m:
        _no_rebuild(m)
        result = train_loop(resumed, task.train, CFG, loss_fn=resumed_loss, resume_dir=partial_dir(ckpt),
                            params=list(resumed.parameters()) + resumed_extra)
    assert result.resumed_from == 6
    return (straight, straight_loss, straight_extra), (resumed, resumed_loss, resumed_extra)


@pytest.mark.parametrize("method", debias.method_names())
def test_interrupted_run_of_each_method_resumes_bit_for_bit(toy_task, tmp_path, monkeypatch, method):
    (straight, straight_loss, straight_extra), (resumed, resumed_loss, resumed_extra) = \
        _straight_and_resumed(toy_task, method, tmp_path, monkeypatch)
    assert torch.equal(_weights(resumed), _weights(straight))
    for a, b in zip(resumed_extra, straight_extra, strict=True):  # learned-mixin's gate
        assert torch.equal(a, b)
    for name, value in straight_loss.state.items():  # Group DRO's q
        assert torch.equal(resumed_loss.state[name], value)
    for name, table in straight_loss.tables.items():  # loaded from the checkpoint, equal to the rebuilt ones
        assert torch.equal(resumed_loss.tables[name], table)
    if method == "group_dro":
        assert not torch.equal(straight_loss.state["q"], torch.full_like(straight_loss.state["q"], 0.25))


def test_distil_with_a_stateful_label_loss_resumes_bit_for_bit(toy_task, tmp_path, monkeypatch):
    """The KD loss wraps Group DRO's: its q is saved and resumed through ``loss_fn.wraps``."""
    distill_mod = importlib.import_module("circuitkd.train.distill")
    teacher = build_model(SPEC.replace(seed=5), toy_task)
    straight = distill(teacher, SPEC, toy_task, debias="group_dro", alpha=0.5, cfg=CFG, seed=0)

    real = distill_mod.make_kd_loss
    with monkeypatch.context() as m:
        m.setattr(distill_mod, "make_kd_loss", lambda *a, **kw: _interrupting(real(*a, **kw)))
        with pytest.raises(Stop):
            distill(teacher, SPEC, toy_task, debias="group_dro", alpha=0.5, cfg=CFG, seed=0,
                    checkpoint=tmp_path / "student")
    resumed = distill(teacher, SPEC, toy_task, debias="group_dro", alpha=0.5, cfg=CFG, seed=0,
                      checkpoint=tmp_path / "student")
    assert torch.equal(_weights(resumed), _weights(straight))


def test_resuming_with_another_method_is_refused(toy_task, tmp_path):
    model = build_model(SPEC.replace(seed=0), toy_task)
    loss_fn, extra = objective("poe", toy_task, model, cfg=CFG, seed=0)
    with pytest.raises(Stop):
        train_loop(model, toy_task.train, CFG, loss_fn=_interrupting(loss_fn), resume_dir=tmp_path / "p",
                   params=list(model.parameters()) + extra)
    other = build_model(SPEC.replace(seed=0), toy_task)
    loss_fn, extra = objective("focal", toy_task, other, cfg=CFG, seed=0)
    with pytest.raises(CircuitKDError, match="belongs to debiasing method 'poe'.*not 'focal'"):
        train_loop(other, toy_task.train, CFG, loss_fn=loss_fn, resume_dir=tmp_path / "p",
                   params=list(other.parameters()) + extra)
    loss_fn, extra = objective("learned_mixin_h", toy_task, other, cfg=CFG, seed=0)
    with pytest.raises(CircuitKDError, match="holds 0 parameters outside the model but this run trains 2"):
        train_loop(other, toy_task.train, CFG, loss_fn=loss_fn, resume_dir=tmp_path / "p",
                   params=list(other.parameters()) + extra)
    with pytest.raises(CircuitKDError, match="state of 1 stateful losses but this run's loss has 0"):
        train_loop(other, toy_task.train, CFG, resume_dir=tmp_path / "p")


def test_dropout_model_resumes_bit_for_bit(toy_task, tmp_path):
    """The loop's RNG (dropout masks) is seeded from the config and restored from the checkpoint."""
    spec = ModelSpec(backbone="bert", n_layers=1, d_model=32, n_heads=2, dropout=0.2, seed=0)
    straight = build_model(spec, toy_task)
    train_loop(straight, toy_task.train, CFG)
    torch.manual_seed(123)  # the caller's RNG does not matter
    model = build_model(spec, toy_task)
    with pytest.raises(Stop):
        train_loop(model, toy_task.train, CFG, loss_fn=_interrupting(cross_entropy_loss), resume_dir=tmp_path / "p")
    torch.rand(7)  # nor how far it has advanced when resuming
    resumed = build_model(spec, toy_task)
    train_loop(resumed, toy_task.train, CFG, resume_dir=tmp_path / "p")
    assert torch.equal(_weights(resumed), _weights(straight))
