"""Colored MNIST: shapes, exact colour/label agreement, OOD reversal, disjoint splits, pairs."""
from __future__ import annotations

import pytest
import torch

from circuitkd.data.colored_mnist import colored_mnist, colorize, stroke_mask
from circuitkd.errors import CircuitKDError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task():
    return colored_mnist(seed=0, strength=0.9, n_train=600, n_id=200, n_ood=200)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Undo the colouring: the stroke sits in exactly one channel."""
    return x.sum(dim=1)


def _image_keys(x: torch.Tensor) -> set[bytes]:
    return {img.numpy().tobytes() for img in _grey(x)}


def test_shapes_ranges_and_names(task):
    assert task.modality == "image" and task.n_classes == 2
    assert task.bias_types == ("color",)
    assert task.group_names == ("0|red", "0|green", "1|red", "1|green")
    for name, n in [("train", 600), ("id_test", 200), ("ood_test", 200)]:
        split = task.split(name)
        assert split.inputs.shape == (n, 3, 28, 28) and split.inputs.dtype == torch.float32
        assert float(split.inputs.min()) >= 0.0 and float(split.inputs.max()) <= 1.0
        assert split.token_classes["colored"].shape == (n, 28, 28)
        assert split.token_classes["colored"].dtype == torch.bool
        assert set(split.labels.tolist()) == {0, 1}
        assert torch.equal(split.groups, split.labels * 2 + split.bias_labels["color"])
        # The blue channel is never used and the stroke sits in the channel of its colour only.
        assert float(split.inputs[:, 2].abs().max()) == 0.0
        colors = split.bias_labels["color"]
        red_used = split.inputs[:, 0].flatten(1).amax(1) > 0
        green_used = split.inputs[:, 1].flatten(1).amax(1) > 0
        assert torch.equal(red_used, colors == 0) and torch.equal(green_used, colors == 1)
        # The mask marks the coloured stroke pixels and only those.
        coloured = split.inputs.amax(1) >= 0.1
        assert torch.equal(coloured, split.token_classes["colored"])


def test_labels_come_from_real_digits(task):
    from circuitkd.data.colored_mnist import _mnist_raw

    pixels, digits = _mnist_raw()
    lookup = {(torch.tensor(p) / 255.0).reshape(28, 28).numpy().tobytes(): int(d >= 5)
              for p, d in zip(pixels, digits)}
    grey = _grey(task.train.inputs[:50])
    for img, y in zip(grey, task.train.labels[:50].tolist()):
        assert lookup[img.numpy().tobytes()] == y


def test_colour_agreement_per_split(task):
    for name, want in [("train", 0.9), ("id_test", 0.9), ("ood_test", 0.0)]:
        split = task.split(name)
        agree = float((split.bias_labels["color"] == split.labels).float().mean())
        assert abs(agree - want) < 0.01, (name, agree)
        for y in (0, 1):  # the same agreement within each class
            rows = split.labels == y
            agree_y = float((split.bias_labels["color"][rows] == y).float().mean())
            assert abs(agree_y - want) < 0.02, (name, y, agree_y)
    assert task.info["color_label_agreement"]["train"] == pytest.approx(0.9, abs=0.01)
    assert task.ood_test.conflicting("color").all()


def test_decorrelated_ood_and_strength():
    task = colored_mnist(seed=1, strength=0.75, ood="decorrelated", n_train=400, n_id=200, n_ood=400)
    train_agree = float((task.train.bias_labels["color"] == task.train.labels).float().mean())
    assert abs(train_agree - 0.75) < 0.01
    ood = task.ood_test
    for y in (0, 1):
        rows = ood.labels == y
        assert abs(float((ood.bias_labels["color"][rows] == 1).float().mean()) - 0.5) < 0.02
    assert task.info["ood"] == "decorrelated" and task.info["strength"] == 0.75


def test_splits_use_disjoint_images(task):
    keys = {name: _image_keys(task.split(name).inputs) for name in ("train", "id_test", "ood_test")}
    assert not keys["train"] & keys["id_test"]
    assert not keys["train"] & keys["ood_test"]
    assert not keys["id_test"] & keys["ood_test"]


def test_deterministic_per_seed():
    a = colored_mnist(seed=3, n_train=100, n_id=50, n_ood=50)
    b = colored_mnist(seed=3, n_train=100, n_id=50, n_ood=50)
    c = colored_mnist(seed=4, n_train=100, n_id=50, n_ood=50)
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.ood_test.labels, b.ood_test.labels)
    assert not torch.equal(a.train.inputs, c.train.inputs)
    pa, pb = a.counterfactual_pairs(n=20, seed=5), b.counterfactual_pairs(n=20, seed=5)
    assert torch.equal(pa.clean, pb.clean) and torch.equal(pa.corrupt, pb.corrupt)


def test_shortcut_pairs_flip_only_the_colour(task):
    pairs = task.counterfactual_pairs(n=64, flip="shortcut", seed=0)
    assert pairs.clean.shape == pairs.corrupt.shape == (64, 3, 28, 28)
    assert pairs.position == 0 and pairs.attention_mask is None
    assert torch.equal(pairs.clean_answer, pairs.corrupt_answer)
    assert torch.equal(_grey(pairs.clean), _grey(pairs.corrupt))  # same digit, same pixels
    assert torch.equal(pairs.meta["clean_bias_label"], pairs.clean_answer)  # clean is colour-aligned
    assert torch.equal(pairs.meta["corrupt_bias_label"], 1 - pairs.clean_answer)
    assert not torch.equal(pairs.clean, pairs.corrupt)
    assert pairs.meta["bias"] == ["color"] * 64
    clean_red = pairs.clean[:, 0].flatten(1).amax(1) > 0
    corrupt_red = pairs.corrupt[:, 0].flatten(1).amax(1) > 0
    assert torch.equal(clean_red, ~corrupt_red)


def test_label_pairs_flip_only_the_digit(task):
    pairs = task.counterfactual_pairs(n=64, flip="label", bias="color", seed=1)
    assert torch.equal(pairs.corrupt_answer, 1 - pairs.clean_answer)
    assert torch.equal(pairs.meta["clean_bias_label"], pairs.meta["corrupt_bias_label"])
    for x_clean, x_corrupt, c in zip(pairs.clean, pairs.corrupt, pairs.meta["clean_bias_label"].tolist()):
        other = 1 - c
        assert float(x_clean[other].abs().max()) == 0.0 and float(x_corrupt[other].abs().max()) == 0.0
        assert float(x_clean[c].max()) > 0 and float(x_corrupt[c].max()) > 0
    assert not torch.equal(_grey(pairs.clean), _grey(pairs.corrupt))


def test_pairs_come_from_held_out_images(task):
    train_keys = _image_keys(task.train.inputs)
    pairs = task.counterfactual_pairs(n=100, flip="label", seed=2)
    assert not (_image_keys(pairs.clean) | _image_keys(pairs.corrupt)) & train_keys


def test_augmentation_is_conflicting_and_from_train(task):
    aug = task.augmentation(n=150, seed=0)
    assert len(aug) == 150 and aug.inputs.shape == (150, 3, 28, 28)
    assert aug.conflicting("color").all()
    assert torch.equal(aug.bias_labels["color"], 1 - aug.labels)
    assert _image_keys(aug.inputs) <= _image_keys(task.train.inputs)
    merged = task.train.concat(aug)
    assert len(merged) == 750 and "colored" in merged.token_classes


def test_image_size_resizes():
    task = colored_mnist(seed=0, n_train=20, n_id=10, n_ood=10, image_size=14)
    assert task.train.inputs.shape == (20, 3, 14, 14)
    assert task.train.token_classes["colored"].shape == (20, 14, 14)
    assert task.seq_len == 14


def test_colorize_and_mask_helpers():
    grey = torch.zeros(2, 4, 4)
    grey[:, 1, 1] = 0.8
    grey[:, 2, 2] = 0.05
    x = colorize(grey, torch.tensor([0, 1]))
    assert x[0, 0, 1, 1] == pytest.approx(0.8) and x[0, 1].abs().max() == 0
    assert x[1, 1, 1, 1] == pytest.approx(0.8) and x[1, 0].abs().max() == 0
    mask = stroke_mask(grey)
    assert mask[:, 1, 1].all() and not mask[:, 2, 2].any()
    with pytest.raises(CircuitKDError, match="2 images but 3 colours"):
        colorize(grey, torch.tensor([0, 1, 0]))


def test_bad_arguments_raise(task):
    with pytest.raises(CircuitKDError, match=r"strength must be a number in \[0, 1\], got 1.5"):
        colored_mnist(strength=1.5)
    with pytest.raises(CircuitKDError, match=r"strength must be a number in \[0, 1\], got nan"):
        colored_mnist(strength=float("nan"))
    with pytest.raises(CircuitKDError, match=r"image_size must be a positive integer, got 0"):
        colored_mnist(image_size=0)
    with pytest.raises(CircuitKDError, match="ood must be"):
        colored_mnist(ood="shuffled")
    with pytest.raises(CircuitKDError, match="exceeds the 5000 MNIST images"):
        colored_mnist(n_train=4000, n_id=800, n_ood=800)
    with pytest.raises(CircuitKDError, match="flip must be"):
        task.counterfactual_pairs(n=4, flip="both")
    with pytest.raises(CircuitKDError, match="unknown bias type"):
        task.counterfactual_pairs(n=4, bias="overlap")
