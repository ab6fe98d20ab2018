import os

import pytest
import torch

from circuitkd.config import ModelSpec
from circuitkd.errors import CircuitKDError
from circuitkd.models import ModelPair, build_model, class_logits, load_checkpoint, save_checkpoint
from circuitkd.models import checkpoint as ckpt


@pytest.mark.parametrize("spec", [
    ModelSpec.preset("tiny", d_vocab=30, n_ctx=12, n_classes=3),
    ModelSpec.preset("bert-student", d_model=32, d_vocab=30, n_ctx=12, n_classes=3),
    ModelSpec.preset("vit-student", d_model=32, n_classes=2),
], ids=["native", "bert", "vit"])
def test_round_trip_gives_identical_outputs(tmp_path, spec):
    model = build_model(spec.replace(seed=3))
    with torch.no_grad():  # make the weights differ from a fresh init
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.rand(2, 3, 28, 28) if spec.backbone == "vit" else torch.randint(0, 30, (2, 9))
    save_checkpoint(model, tmp_path / "m", config={"note": "x"})
    loaded = load_checkpoint(tmp_path / "m")
    assert torch.equal(class_logits(loaded, x), class_logits(model, x))
    assert ckpt.load_config(tmp_path / "m") == {"note": "x"}


def test_checkpoint_that_does_not_match_its_spec(tmp_path):
    model = build_model(ModelSpec.preset("tiny", d_vocab=30, n_ctx=12, n_classes=3))
    save_checkpoint(model, tmp_path / "m")
    ModelSpec.preset("tiny", d_vocab=30, n_ctx=12, n_classes=3, d_model=64).to_json(tmp_path / "m" / "spec.json")
    (tmp_path / "m" / "manifest.json").unlink()  # a folder saved before manifests: the weights are still checked
    with pytest.raises(CircuitKDError, match="does not match its spec.*shape mismatch"):
        load_checkpoint(tmp_path / "m")


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CircuitKDError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CircuitKDError, match="not a circuitkd checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_failed_save_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    spec = ModelSpec.preset("tiny", d_vocab=30, n_ctx=12, n_classes=3)
    good = build_model(spec)
    save_checkpoint(good, tmp_path / "m")
    before = sorted(os.listdir(tmp_path / "m"))
    other = build_model(spec.replace(seed=5))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(other, tmp_path / "m")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "m")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind
    x = torch.randint(0, 30, (2, 9))
    assert torch.equal(class_logits(load_checkpoint(tmp_path / "m"), x), class_logits(good, x))


def test_model_pair_round_trip(tmp_path):
    t = build_model(ModelSpec.preset("tiny", d_vocab=30, n_ctx=12, n_classes=3, n_layers=2))
    s = build_model(ModelSpec.preset("tiny", d_vocab=30, n_ctx=12, n_classes=3, seed=1))
    ModelPair(t, s, teacher_name="poe-teacher", student_name="kd-student").save(tmp_path / "pair")
    pair = ModelPair.load(tmp_path / "pair")
    x = torch.randint(0, 30, (2, 9))
    assert torch.equal(class_logits(pair.teacher, x), class_logits(t, x))
    assert torch.equal(class_logits(pair.student, x), class_logits(s, x))
    assert pair.teacher_name == "poe-teacher" and "2L" in pair.describe()
