"""Issue 16's training rows: each bad input is a one-line CircuitKDError before anything trains."""
import pytest
import torch

import circuitkd as ckd
from circuitkd.config import TrainCfg
from circuitkd.errors import CircuitKDError

TINY = ckd.ModelSpec.preset("tiny")
CFG = TrainCfg(steps=2, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def nli():
    torch.set_num_threads(1)
    return ckd.data.synthetic_nli(seed=0, n_train=60, n_id=30, n_ood=30)


def test_train_model_checkpoint_holding_another_architecture(nli, tmp_path):
    ckd.train_model(TINY, nli, seed=0, cfg=CFG, checkpoint=tmp_path / "m")
    with pytest.raises(CircuitKDError, match="holds a different model.*n_layers"):
        ckd.train_model(TINY.replace(n_layers=2), nli, seed=0, cfg=CFG, checkpoint=tmp_path / "m")
    # the same architecture is loaded, not retrained
    again = ckd.train_model(TINY, nli, seed=0, cfg=CFG, checkpoint=tmp_path / "m")
    assert ckd.models.spec_of(again).n_layers == TINY.n_layers


def test_distilling_an_nli_teacher_onto_an_image_task(nli):
    teacher = ckd.build_model(TINY, nli, device="cpu")
    images = ckd.data.colored_mnist(seed=0, n_train=60, n_id=30, n_ood=30)
    with pytest.raises(CircuitKDError, match="cannot distil a 'native' teacher .*text.* on the image task"):
        ckd.distill(teacher, ckd.ModelSpec.preset("vit-student"), images, cfg=CFG)


def test_d_vocab_below_the_task_vocabulary(nli):
    with pytest.raises(CircuitKDError, match=r"d_vocab=5 is below task 'synthetic_nli'"):
        ckd.build_model(TINY.replace(d_vocab=5), nli, device="cpu")
