import pytest
import torch

from circuitkd.config import ModelSpec, TrainCfg
from circuitkd.errors import CircuitKDError
from circuitkd.train.bias_models import bias_features, known_bias_probs, unknown_bias_probs
from tests.train.toy import toy_task


def test_known_bias_model_matches_shortcut_frequencies():
    task = toy_task(0, n_train=2000, n_test=200)
    probs = known_bias_probs(task, "cue")
    train = task.train
    cue = train.bias_labels["cue"]
    # A logistic model on a one-hot indicator recovers P(y | cue) (up to the small ridge).
    for c in (0, 1):
        freq = (train.labels[cue == c] == c).float().mean()
        assert probs[cue == c][:, c].mean().item() == pytest.approx(freq.item(), abs=0.01)
    # The bias-only model is at chance on the OOD split's gold labels... worse: it is always wrong there.
    ood = known_bias_probs(task, "all", split=task.ood_test)
    assert (ood.argmax(-1) != task.ood_test.labels).float().mean() > 0.99
    assert torch.allclose(probs.sum(-1), torch.ones(len(train)))


def test_bias_features_and_errors():
    task = toy_task(0, n_train=50, n_test=10)
    x = bias_features(task.train, ["cue"], 2)
    assert x.shape == (50, 3) and torch.all(x.sum(1) == 1)
    with pytest.raises(CircuitKDError, match="unknown bias 'overlap'.*cue"):
        known_bias_probs(task, "overlap")


def test_unknown_bias_model_is_confident_on_shortcut():
    torch.manual_seed(0)
    task = toy_task(0, n_train=1000, n_test=100)
    spec = ModelSpec(n_layers=1, d_model=32, n_heads=2)
    probs = unknown_bias_probs(task, spec, n_examples=300, steps=60, seed=0,
                               cfg=TrainCfg(batch_size=32, lr=3e-3, progress=False), device="cpu")
    assert probs.shape == (1000, 2)
    # Trained briefly on a small subset, it picks up the easy cue: it agrees with the cue on most examples.
    cue = task.train.bias_labels["cue"]
    assert (probs.argmax(-1) == cue).float().mean() > 0.9
