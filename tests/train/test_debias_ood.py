"""Each debiasing method moves OOD accuracy up on a small synthetic task with a planted shortcut.

Task: ``tests/train/toy.py`` (label = whether "a" outnumbers "b"; a cue token agrees with the
label on 98 % of training examples and never on the OOD split). Model: 1 layer, d=32, trained
80 steps at batch 32 (a budget at which a plain model still leans on the cue). We average OOD
accuracy over seeds 0, 1, 2 and require each method to beat plain training by at least
``MARGIN`` = 0.04 (4 points). Measured on the reference machine: plain 0.73; reweight 0.95,
poe 0.98, learned_mixin_h 0.96, focal (γ=1) 0.96, confreg 0.86, group_dro (η=0.1) 0.81,
jtt (λ_up=20, identification at 40 steps) 0.82.
"""
import pytest
import torch

import circuitkd as ckd
from circuitkd.config import DebiasCfg, ModelSpec, TrainCfg
from tests.train.toy import toy_task

SEEDS = (0, 1, 2)
MARGIN = 0.04
SPEC = ModelSpec(n_layers=1, d_model=32, n_heads=2)
CFG = TrainCfg(steps=80, batch_size=32, lr=3e-3, progress=False)
# Small-task settings: the toy split has only ~2 % conflicting examples, so Group DRO needs a
# faster step, JTT a larger upweight, and focal loss γ=1 (γ=2 leaves too little gradient
# signal in 80 steps).
OPTIONS = DebiasCfg(dro_eta=0.1, jtt_upweight=20.0, jtt_id_frac=0.5, focal_gamma=1.0)


@pytest.fixture(scope="module")
def task():
    return toy_task(0)


def _mean_ood(task, debias):
    accs = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = ckd.train_model(SPEC, task, debias=debias, seed=seed, cfg=CFG, device="cpu",
                                debias_options=None if debias == "none" else {"options": OPTIONS})
        accs.append(ckd.evaluate(model, task)["ood_acc"])
    return sum(accs) / len(accs)


@pytest.fixture(scope="module")
def plain_ood(task):
    torch.set_num_threads(1)
    return _mean_ood(task, "none")


@pytest.mark.parametrize("method", ["reweight", "poe", "learned_mixin_h", "focal", "confreg", "group_dro", "jtt"])
def test_method_raises_ood_accuracy(task, plain_ood, method):
    ood = _mean_ood(task, method)
    assert plain_ood < 0.85, f"the plain model should still lean on the cue (OOD {plain_ood:.3f})"
    assert ood >= plain_ood + MARGIN, f"{method}: OOD {ood:.3f} vs plain {plain_ood:.3f}"
