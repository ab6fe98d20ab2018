import pytest
import torch

from circuitkd.config import ModelSpec, TrainCfg
from circuitkd.errors import CircuitKDError
from circuitkd.models import build_model, class_logits, is_checkpoint
from circuitkd.train import train_loop, train_model
from circuitkd.train.train import partial_dir

CFG = TrainCfg(steps=30, batch_size=32, lr=3e-3, progress=False)
SPEC = ModelSpec.preset("tiny")


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_training_is_deterministic_and_learns(toy_task):
    a = train_model(SPEC, toy_task, cfg=CFG, seed=0)
    b = train_model(SPEC, toy_task, cfg=CFG, seed=0)
    c = train_model(SPEC, toy_task, cfg=CFG, seed=1)
    assert torch.equal(_weights(a), _weights(b))
    assert not torch.equal(_weights(a), _weights(c))
    assert a.circuitkd_train["final_loss"] < 0.69  # below chance-level cross-entropy for 2 classes
    assert not a.training


def test_resume_after_interruption_matches_uninterrupted_run(toy_task, tmp_path):
    cfg = CFG.replace(checkpoint_every=10)
    straight = train_model(SPEC, toy_task, cfg=cfg, seed=0)

    class Stop(Exception):
        pass

    def interrupting_loss(model, batch, step):
        if step == 15:
            raise Stop
        return torch.nn.functional.cross_entropy(batch.logits(model), batch.labels)

    model = build_model(SPEC.replace(seed=0), toy_task)
    resume = partial_dir(tmp_path / "m")
    with pytest.raises(Stop):
        train_loop(model, toy_task.train, cfg, loss_fn=interrupting_loss, resume_dir=resume)
    assert is_checkpoint(resume)
    resumed = train_model(SPEC, toy_task, cfg=cfg, seed=0, checkpoint=tmp_path / "m")
    assert torch.allclose(_weights(resumed), _weights(straight), atol=1e-6)
    assert is_checkpoint(tmp_path / "m") and not resume.exists()
    # a finished checkpoint is loaded, not retrained
    again = train_model(SPEC, toy_task, cfg=cfg, seed=0, checkpoint=tmp_path / "m")
    assert torch.equal(_weights(again), _weights(resumed))


def test_nan_loss_stops_with_a_clear_error(toy_task):
    model = build_model(SPEC, toy_task)

    def nan_loss(model, batch, step):
        return class_logits(model, batch.inputs, batch.attention_mask).sum() * float("nan")

    with pytest.raises(CircuitKDError, match="loss is nan at step 0"):
        train_loop(model, toy_task.train, CFG, loss_fn=nan_loss)


def test_labels_that_do_not_fit_the_model(toy_task):
    model = build_model(SPEC.replace(n_classes=2, d_vocab=20, n_ctx=8))
    split = toy_task.train
    split.labels[0] = 4
    with pytest.raises(CircuitKDError, match=r"labels span \[0, 4\] but the model has 2 classes"):
        train_loop(model, split, CFG)
