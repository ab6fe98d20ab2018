"""Every method builds and trains on an image task (Colored MNIST, ViT) and a text task."""
import pytest
import torch

import circuitkd as ckd
from circuitkd.config import DebiasCfg, ModelSpec, TrainCfg
from circuitkd.train.debias import METHODS, make_objective
from tests.train.toy import toy_task

CFG = TrainCfg(steps=3, batch_size=16, progress=False)
OPTIONS = DebiasCfg(unknown_examples=32, unknown_steps=2)


@pytest.fixture(scope="module")
def image_task():
    from circuitkd.data.colored_mnist import colored_mnist  # part of the package: failing to import is a failure
    return colored_mnist(seed=0, n_train=96, n_id=32, n_ood=32, image_size=14)


@pytest.mark.parametrize("method", [*METHODS, "poe:unknown", "focal:color"])
def test_method_trains_on_image_task(image_task, method):
    spec = ModelSpec.preset("vit-student", n_layers=1, d_model=32, n_heads=2, patch_size=7)
    model = ckd.train_model(spec, image_task, debias=method, seed=0, cfg=CFG, device="cpu",
                            debias_options={"options": OPTIONS})
    scores = ckd.evaluate(model, image_task)
    assert 0.0 <= scores["ood_acc"] <= 1.0
    assert model.circuitkd_train["debias"] == method


def test_lmh_gate_is_trained_and_bias_probs_are_per_split():
    task = toy_task(0, n_train=128, n_test=16)
    model = ckd.build_model(ModelSpec(n_layers=1, d_model=32, n_heads=2), task, device="cpu")
    loss_fn, extra = make_objective("learned_mixin_h", task, model, cfg=CFG, seed=0)
    assert len(extra) == 2 and loss_fn.bias_probs.shape == (128, 2)
    aug = task.augmentation(40, seed=0)
    both = task.train.concat(aug)
    loss_fn, _ = make_objective("poe", task, model, cfg=CFG, seed=0, split=both)
    assert loss_fn.bias_probs.shape == (168, 2)
    # The augmentation examples conflict with the cue, so their gold-label bias probability is low.
    gold = loss_fn.bias_probs[torch.arange(168), both.labels]
    assert gold[128:].max() < 0.2 < gold[:128].mean()
