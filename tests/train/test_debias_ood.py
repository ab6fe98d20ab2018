"""Each debiasing method moves OOD accuracy up on a small synthetic task with a planted shortcut.

Task: ``tests/train/toy.py`` (label = whether "a" outnumbers "b"; a cue token agrees with the
label on 98 % of training examples and never on the OOD split). Model: 1 layer, d=32, trained
80 steps at batch 32 (a budget at which a plain model still leans on the cue). We average OOD
accuracy over seeds 0, 1, 2 and require each method to beat plain training by at least
``MARGIN`` = 0.04 (4 points). Measured on the reference machine: plain 0.685; reweight 0.948,
poe 0.981, learned_mixin_h 0.968, focal (γ=1) 0.981, group_dro (η=0.1) 0.848, jtt (λ_up=20,
identification at 40 steps) 0.770.

Confidence regularisation is the exception: it self-distils from a plain model of the same
budget, which on this toy is itself biased, and at 98 % bias strength the scaled targets of
the aligned examples are nearly uniform, so it does not beat plain training here (0.623 vs
0.685; one seed collapses). Its test is the ablation of its mechanism instead: scaled targets
vs the same plain teacher's unscaled ones (KD at T=1, α=0), 0.623 vs 0.508, same margin.
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


@pytest.mark.parametrize("method", ["reweight", "poe", "learned_mixin_h", "focal", "group_dro", "jtt"])
def test_method_raises_ood_accuracy(task, plain_ood, method):
    ood = _mean_ood(task, method)
    assert plain_ood < 0.85, f"the plain model should still lean on the cue (OOD {plain_ood:.3f})"
    assert ood >= plain_ood + MARGIN, f"{method}: OOD {ood:.3f} vs plain {plain_ood:.3f}"


def test_confreg_scaling_raises_ood_over_unscaled_self_distillation(task):
    scaled, unscaled = [], []
    for seed in SEEDS:
        torch.manual_seed(seed)
        teacher = ckd.train_model(SPEC, task, seed=seed, cfg=CFG, device="cpu")
        conf = ckd.train_model(SPEC, task, debias="confreg", seed=seed, cfg=CFG, device="cpu",
                               debias_options={"teacher": teacher, "options": OPTIONS})
        plain_sd = ckd.distill(teacher, SPEC, task, alpha=0.0, temperature=1.0, seed=seed, cfg=CFG)
        scaled.append(ckd.evaluate(conf, task)["ood_acc"])
        unscaled.append(ckd.evaluate(plain_sd, task)["ood_acc"])
    assert sum(scaled) / 3 >= sum(unscaled) / 3 + MARGIN, (scaled, unscaled)
