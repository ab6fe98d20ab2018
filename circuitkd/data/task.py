"""The task type every data source returns: splits with per-example bias annotations.

A ``Task`` carries train / in-distribution / out-of-distribution splits. Each example
records, for every shortcut (bias) type the task knows, the label that shortcut
predicts (-1 where the example does not contain it), so accuracy can be reported per
bias type, per group (label × shortcut) and for the worst group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from circuitkd.errors import CircuitKDError
from circuitkd.types import PromptPairs

SPLITS = ("train", "id_test", "ood_test")


@dataclass
class Split:
    """One split of a task.

    Attributes:
        inputs: ``Int[n pos]`` token ids right-padded with the pad id, or ``Float[n channel height width]`` pixels.
        labels: ``Int[n]`` gold labels in ``[0, n_classes)``.
        bias_labels: bias type -> ``Int[n]``: the label that shortcut predicts, -1 where absent.
        groups: ``Int[n]`` index into ``Task.group_names``.
        attention_mask: ``Int[n pos]`` (1 = real token) for text, None for images.
        token_classes: class name -> ``Bool[n pos]`` marking token positions (overlap words,
            negation words, cue words, premise, hypothesis, ...); for images, name -> ``Bool[n height width]``
            pixel masks (e.g. coloured pixels).
    """

    inputs: Tensor
    labels: Tensor
    bias_labels: dict[str, Tensor]
    groups: Tensor
    attention_mask: Optional[Tensor] = None
    token_classes: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.inputs.shape[0]
        if self.labels.shape != (n,):
            raise CircuitKDError(f"labels shape {tuple(self.labels.shape)} does not match {n} inputs")
        if self.groups.shape != (n,):
            raise CircuitKDError(f"groups shape {tuple(self.groups.shape)} does not match {n} inputs")
        for name, b in self.bias_labels.items():
            if b.shape != (n,):
                raise CircuitKDError(f"bias_labels[{name!r}] shape {tuple(b.shape)} does not match {n} inputs")
        if self.attention_mask is not None and self.attention_mask.shape != self.inputs.shape[:2]:
            raise CircuitKDError(
                f"attention_mask shape {tuple(self.attention_mask.shape)} does not match inputs "
                f"{tuple(self.inputs.shape[:2])}"
            )

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, idx: Tensor | slice) -> "Split":
        """The examples at ``idx`` (an index tensor, bool mask or slice)."""
        return Split(
            inputs=self.inputs[idx],
            labels=self.labels[idx],
            bias_labels={k: v[idx] for k, v in self.bias_labels.items()},
            groups=self.groups[idx],
            attention_mask=None if self.attention_mask is None else self.attention_mask[idx],
            token_classes={k: v[idx] for k, v in self.token_classes.items()},
        )

    def has_bias(self, bias: str) -> Tensor:
        """``Bool[n]``: which examples contain shortcut ``bias``."""
        if bias not in self.bias_labels:
            raise CircuitKDError(f"unknown bias type {bias!r}; this split has {sorted(self.bias_labels)}")
        return self.bias_labels[bias] >= 0

    def aligned(self, bias: str | None = None) -> Tensor:
        """``Bool[n]``: examples where the shortcut(s) present all predict the gold label."""
        names = [bias] if bias is not None else list(self.bias_labels)
        out = torch.ones(len(self), dtype=torch.bool)
        for name in names:
            b = self.bias_labels[name] if name in self.bias_labels else self.has_bias(name)
            out &= (b < 0) | (b == self.labels)
        return out

    def conflicting(self, bias: str | None = None) -> Tensor:
        """``Bool[n]``: examples where some shortcut present predicts a label other than the gold one."""
        names = [bias] if bias is not None else list(self.bias_labels)
        out = torch.zeros(len(self), dtype=torch.bool)
        for name in names:
            b = self.bias_labels[name] if name in self.bias_labels else self.has_bias(name)
            out |= (b >= 0) & (b != self.labels)
        return out

    def concat(self, other: "Split") -> "Split":
        """This split followed by ``other`` (text inputs are re-padded to a common length)."""
        if set(self.bias_labels) != set(other.bias_labels):
            raise CircuitKDError(
                f"cannot concatenate splits with bias types {sorted(self.bias_labels)} and {sorted(other.bias_labels)}"
            )
        a_in, b_in, a_m, b_m = self.inputs, other.inputs, self.attention_mask, other.attention_mask
        a_tc, b_tc = dict(self.token_classes), dict(other.token_classes)
        if a_in.dim() == 2 and a_in.shape[1] != b_in.shape[1]:
            width = max(a_in.shape[1], b_in.shape[1])
            pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
            pad_id = int(a_in[a_m == 0][0]) if a_m is not None and (a_m == 0).any() else 0
            a_in, b_in = pad(a_in, pad_id), pad(b_in, pad_id)
            a_m, b_m = pad(a_m, 0), pad(b_m, 0)
            a_tc = {k: pad(v, False) for k, v in a_tc.items()}
            b_tc = {k: pad(v, False) for k, v in b_tc.items()}
        shared = set(a_tc) & set(b_tc)
        return Split(
            inputs=torch.cat([a_in, b_in]),
            labels=torch.cat([self.labels, other.labels]),
            bias_labels={k: torch.cat([self.bias_labels[k], other.bias_labels[k]]) for k in self.bias_labels},
            groups=torch.cat([self.groups, other.groups]),
            attention_mask=None if a_m is None else torch.cat([a_m, b_m]),
            token_classes={k: torch.cat([a_tc[k], b_tc[k]]) for k in shared},
        )


PairFn = Callable[..., PromptPairs]
AugmentFn = Callable[..., Split]


@dataclass
class Task:
    """A classification task with shortcut annotations.

    Attributes:
        name: e.g. "synthetic_nli", "colored_mnist", "mnli".
        modality: "text" or "image".
        n_classes: number of labels.
        label_names: one name per label.
        bias_types: shortcut types annotated on every split (keys of ``Split.bias_labels``).
        group_names: names of the groups ``Split.groups`` indexes.
        splits: "train", "id_test", "ood_test" (and any others) -> :class:`Split`.
        tokenizer: the tokenizer the text inputs were made with (None for images).
        info: the generator's parameters, saved with results.
    """

    name: str
    modality: str
    n_classes: int
    label_names: tuple[str, ...]
    bias_types: tuple[str, ...]
    group_names: tuple[str, ...]
    splits: dict[str, Split]
    tokenizer: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    pair_fn: Optional[PairFn] = None
    augment_fn: Optional[AugmentFn] = None

    def __post_init__(self) -> None:
        for split_name, split in self.splits.items():
            if len(split) == 0:
                continue
            lo, hi = int(split.labels.min()), int(split.labels.max())
            if lo < 0 or hi >= self.n_classes:
                raise CircuitKDError(
                    f"split {split_name!r} has labels in [{lo}, {hi}] but the task declares "
                    f"n_classes={self.n_classes}"
                )
            missing = set(self.bias_types) - set(split.bias_labels)
            if missing:
                raise CircuitKDError(f"split {split_name!r} lacks bias annotations for {sorted(missing)}")

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise CircuitKDError(f"task {self.name!r} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    @property
    def train(self) -> Split:
        return self.split("train")

    @property
    def id_test(self) -> Split:
        return self.split("id_test")

    @property
    def ood_test(self) -> Split:
        return self.split("ood_test")

    @property
    def pad_id(self) -> int:
        return int(getattr(self.tokenizer, "pad_token_id", 0) or 0)

    @property
    def seq_len(self) -> int:
        """Longest input length over all splits (text), or number of pixels per side (image)."""
        return max(int(s.inputs.shape[-1]) for s in self.splits.values())

    @property
    def vocab_size(self) -> Optional[int]:
        if self.tokenizer is None:
            return None
        return int(getattr(self.tokenizer, "vocab_size", None) or len(self.tokenizer))

    def check_bias(self, bias: str) -> None:
        if bias not in self.bias_types:
            raise CircuitKDError(f"unknown bias type {bias!r} for task {self.name!r}; expected one of {self.bias_types}")

    def counterfactual_pairs(self, n: int = 256, *, flip: str = "shortcut", bias: str | None = None,
                             seed: int = 0) -> PromptPairs:
        """Clean/corrupt pairs of equal length differing in one minimal edit.

        ``flip="shortcut"``: the corrupt input flips only the shortcut (``bias`` picks which;
        None mixes all), so its true label stays and the shortcut's prediction changes.
        ``flip="label"``: the corrupt input flips only the true label, the shortcut kept.
        Both sides' answers are their gold labels, so with ``flip="shortcut"`` they agree: for
        patching and circuits use :meth:`shortcut_pairs`, which contrasts gold with the shortcut.
        """
        if flip not in ("shortcut", "label"):
            raise CircuitKDError(f"flip must be 'shortcut' or 'label', got {flip!r}")
        if bias is not None:
            self.check_bias(bias)
        if self.pair_fn is None:
            raise CircuitKDError(f"task {self.name!r} cannot generate counterfactual pairs")
        return self.pair_fn(n=n, flip=flip, bias=bias, seed=seed)

    def shortcut_pairs(self, n: int = 256, bias: str | None = None, seed: int = 0) -> PromptPairs:
        """``n`` pairs that contrast the gold label with a shortcut's: the input to patching and circuits.

        The clean input's shortcut is absent or agrees with the gold label; the corrupt input is
        the same text or image with one minimal edit after which the shortcut (``bias``; None
        mixes all) points to another label. ``clean_answer`` is the gold label (the same on both
        sides) and ``corrupt_answer`` the shortcut's label on the corrupt input, so the default
        logit-difference metric measures how far a model holds the gold label against the
        shortcut. ``meta["bias"]`` names each pair's flipped shortcut. Text pairs are cut to the
        longest real length among them.

        Built from ``counterfactual_pairs(flip="shortcut")``: pairs whose shortcut conflicts on
        the clean side are swapped, pairs where neither side conflicts are dropped.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise CircuitKDError(f"shortcut_pairs needs n >= 1 pairs, got n={n!r}")
        kept: list[PromptPairs] = []
        total = 0
        for attempt in range(8):
            if total >= n:
                break
            raw = self.counterfactual_pairs(max(2 * n, 64), flip="shortcut", bias=bias, seed=seed + 7919 * attempt)
            if raw.meta is None or "clean_bias_label" not in raw.meta:
                raise CircuitKDError(f"task {self.name!r} pairs carry no shortcut labels "
                                     "(meta['clean_bias_label'] / meta['corrupt_bias_label'])")
            gold, names = raw.clean_answer, raw.meta.get("bias")
            clean_bias, corrupt_bias = raw.meta["clean_bias_label"], raw.meta["corrupt_bias_label"]
            agrees = lambda b: (b < 0) | (b == gold)  # noqa: E731
            conflicts = lambda b: (b >= 0) & (b != gold)  # noqa: E731
            for swap, keep in ((False, agrees(clean_bias) & conflicts(corrupt_bias)),
                               (True, agrees(corrupt_bias) & conflicts(clean_bias))):
                idx = keep.nonzero().flatten()
                if not len(idx):
                    continue
                clean, corrupt = (raw.corrupt, raw.clean) if swap else (raw.clean, raw.corrupt)
                kept.append(PromptPairs(
                    clean=clean[idx], corrupt=corrupt[idx], clean_answer=gold[idx],
                    corrupt_answer=(clean_bias if swap else corrupt_bias)[idx],
                    attention_mask=None if raw.attention_mask is None else raw.attention_mask[idx],
                    position=raw.position,
                    meta={"bias": [names[i] if names is not None else bias for i in idx.tolist()]}))
                total += len(idx)
        if total < n:
            raise CircuitKDError(f"task {self.name!r} produced only {total} of {n} pairs whose shortcut "
                                 f"({bias or 'any'}) conflicts with the gold label")
        cat = lambda name: torch.cat([getattr(p, name) for p in kept])[:n]  # noqa: E731
        mask = None if kept[0].attention_mask is None else cat("attention_mask")
        width = int(mask.sum(1).max()) if mask is not None else None
        return PromptPairs(
            clean=cat("clean")[:, :width], corrupt=cat("corrupt")[:, :width],
            clean_answer=cat("clean_answer"), corrupt_answer=cat("corrupt_answer"),
            attention_mask=None if mask is None else mask[:, :width], position=kept[0].position,
            meta={"kind": "shortcut-conflict", "seed": seed, "bias": [b for p in kept for b in p.meta["bias"]][:n]})

    def augmentation(self, n: int = 1000, *, seed: int = 0) -> Split:
        """Extra bias-conflicting / counterfactual training examples (the augmentation fix)."""
        if self.augment_fn is None:
            raise CircuitKDError(f"task {self.name!r} cannot generate augmentation data")
        return self.augment_fn(n=n, seed=seed)
