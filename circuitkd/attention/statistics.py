"""Per-head attention statistics streamed over a dataset (Clark et al. 2019, "What Does BERT Look
At? An Analysis of BERT's Attention"): attention mass to each token class, entropy, alignment and
positional scores."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from circuitkd.data.task import Split, Task
from circuitkd.errors import CircuitKDError
from circuitkd.hooks import Site, backbone_of, is_causal, n_heads, n_layers
from circuitkd.attention.common import (
    _batches, _check_inputs, _class_stack, _Data, _pattern_sites, _patterns, position_masks, _prepare,
    _read_index, _real_positions, _run_batch, SHORTCUT, _top,
)

#: Name of the union of the shortcut token classes in every statistic.

@dataclass
class AttentionStats:
    """Per-head attention statistics of one model on one dataset; every tensor is ``[layer head]``.

    Attributes:
        from_read: token class -> mean attention mass from the read-out position (CLS) to
            that class's positions, over the examples where the class marks a position.
            ``"shortcut"`` is the union of the shortcut classes.
        from_all: the same from every real position (mean over destinations, then examples).
        entropy / entropy_read: mean entropy (nats) of the attention distribution of every
            real destination / of the read-out position.
        prev_token / next_token: mean attention from position i to i-1 / i+1.
        duplicate_token: mean attention to other positions holding the same token id, over
            positions that have one (None for images).
        alignment: mean attention from a hypothesis token to premise positions holding the
            same word, over hypothesis tokens that occur in the premise (None without
            premise/hypothesis classes or for images).
        class_counts: token class -> number of examples where it marks a position.
        shortcut: the shortcut token classes; ``n_examples``, ``split`` describe the data.
    """

    from_read: dict[str, Tensor]
    from_all: dict[str, Tensor]
    entropy: Tensor
    entropy_read: Tensor
    prev_token: Tensor
    next_token: Tensor
    duplicate_token: Optional[Tensor]
    alignment: Optional[Tensor]
    class_counts: dict[str, int]
    shortcut: tuple[str, ...]
    n_examples: int
    split: Optional[str] = None
    backbone: str = ""

    @property
    def n_layers(self) -> int:
        return int(self.entropy.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.entropy.shape[1])

    def shortcut_attention(self, cls: str = SHORTCUT, *, source: str = "read") -> Float[Tensor, "layer head"]:
        """``[layer head]`` attention to ``cls`` (default: all shortcut tokens) from "read" or "all" positions."""
        table = {"read": self.from_read, "all": self.from_all}.get(source)
        if table is None:
            raise CircuitKDError(f"source must be 'read' or 'all', got {source!r}")
        if cls not in table:
            raise CircuitKDError(f"unknown token class {cls!r}; known token classes: {sorted(table)}")
        return table[cls]

    def top_heads(self, k: int = 3, cls: str = SHORTCUT, *, source: str = "read") -> list[tuple[int, int, float]]:
        """The ``k`` heads with the most attention to ``cls``: ``[(layer, head, mass), ...]``."""
        return _top(self.shortcut_attention(cls, source=source), k)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "from_read": {k: v.tolist() for k, v in self.from_read.items()},
            "from_all": {k: v.tolist() for k, v in self.from_all.items()},
        }
        for name in ("entropy", "entropy_read", "prev_token", "next_token", "duplicate_token", "alignment"):
            value = getattr(self, name)
            out[name] = None if value is None else value.tolist()
        out.update(class_counts=dict(self.class_counts), shortcut=list(self.shortcut), n_examples=self.n_examples,
                   split=self.split, backbone=self.backbone)
        return out


class _HeadStats:
    """Streaming accumulator behind :class:`AttentionStats` (fixed-size state)."""

    def __init__(self, L: int, H: int, class_names: list[str], causal: bool, alignment: bool, tokens: bool):
        self.L, self.H, self.names, self.causal = L, H, class_names, causal
        C = len(class_names)
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.read_sum, self.all_sum, self.class_n = z(L, H, C), z(L, H, C), z(C)
        self.ent_sum, self.ent_read_sum = z(L, H), z(L, H)
        self.prev_sum, self.next_sum, self.prev_n, self.next_n = z(L, H), z(L, H), 0.0, 0.0
        self.dup_sum, self.dup_n = (z(L, H), 0.0) if tokens else (None, 0.0)
        self.align_sum, self.align_n = (z(L, H), 0.0) if alignment else (None, 0.0)
        self.n = 0

    def update(self, pattern: Tensor, real: Tensor, read: Tensor, classes: Tensor,
               tokens: Optional[Tensor], premise: Optional[Tensor], hypothesis: Optional[Tensor]) -> None:
        """``pattern`` [b L H q k] (float64), ``real`` [b pos], ``read`` [b], ``classes`` Bool[b C pos]."""
        b, P = pattern.shape[0], pattern.shape[-1]
        dev = pattern.device
        ar = torch.arange(b, device=dev)
        n_dest = real.sum(1)  # [b]
        cls_f = classes.to(pattern.dtype)
        mass = torch.einsum("blhqk,bck->blhqc", pattern, cls_f)
        present = classes.any(-1).to(pattern.dtype)  # [b C]
        at_read = mass[ar, :, :, read]  # [b L H C]
        over_all = (mass * real[:, None, None, :, None]).sum(3) / n_dest[:, None, None, None]
        self.read_sum += torch.einsum("blhc,bc->lhc", at_read, present).cpu()
        self.all_sum += torch.einsum("blhc,bc->lhc", over_all, present).cpu()
        self.class_n += present.sum(0).cpu()

        ent = -torch.xlogy(pattern, pattern).sum(-1)  # [b L H q]
        self.ent_sum += ((ent * real[:, None, None]).sum(-1) / n_dest[:, None, None]).sum(0).cpu()
        self.ent_read_sum += ent[ar, :, :, read].sum(0).cpu()

        # position i -> i-1 (dest i real, i >= 1) and i -> i+1 (both real)
        prev = torch.diagonal(pattern, offset=-1, dim1=-2, dim2=-1)  # [b L H P-1]: dest i+1, src i
        nxt = torch.diagonal(pattern, offset=1, dim1=-2, dim2=-1)  # dest i, src i+1
        w_prev = real[:, 1:] * real[:, :-1]
        w_next = real[:, :-1] * real[:, 1:]
        for acc, diag, w, attr in ((self.prev_sum, prev, w_prev, "prev_n"), (self.next_sum, nxt, w_next, "next_n")):
            cnt = w.sum(1)
            ok = cnt > 0
            per_ex = (diag * w[:, None, None]).sum(-1) / cnt.clamp_min(1)[:, None, None]
            acc += (per_ex * ok[:, None, None]).sum(0).cpu()
            setattr(self, attr, getattr(self, attr) + float(ok.sum()))

        if tokens is not None and self.dup_sum is not None:
            same = tokens[:, :, None] == tokens[:, None, :]
            same &= ~torch.eye(P, dtype=torch.bool, device=dev)[None]
            if self.causal:
                same &= torch.tril(torch.ones(P, P, dtype=torch.bool, device=dev))[None]
            same &= (real[:, :, None] > 0) & (real[:, None, :] > 0)
            self._masked_target(pattern, same, "dup")
        if premise is not None and hypothesis is not None and self.align_sum is not None:
            same = tokens[:, :, None] == tokens[:, None, :]
            align = same & hypothesis[:, :, None] & premise[:, None, :]
            self._masked_target(pattern, align, "align")
        self.n += b

    def _masked_target(self, pattern: Tensor, target: Tensor, name: str) -> None:
        """Mean attention onto ``target[b, dest, src]`` over destinations that have a target."""
        score = (pattern * target[:, None, None].to(pattern.dtype)).sum(-1)  # [b L H q]
        dests = target.any(-1).to(pattern.dtype)  # [b q]
        cnt = dests.sum(1)
        ok = cnt > 0
        per_ex = (score * dests[:, None, None]).sum(-1) / cnt.clamp_min(1)[:, None, None]
        total = getattr(self, f"{name}_sum")
        total += (per_ex * ok[:, None, None]).sum(0).cpu()
        setattr(self, f"{name}_n", getattr(self, f"{name}_n") + float(ok.sum()))

    def result(self, shortcut: tuple[str, ...], split: Optional[str], backbone: str) -> AttentionStats:
        if self.n == 0:
            raise CircuitKDError("attention statistics saw no examples")
        div = lambda s, c: (s / c).float() if c > 0 else torch.full_like(s, float("nan")).float()  # noqa: E731
        from_read, from_all, counts = {}, {}, {}
        for i, name in enumerate(self.names):
            c = float(self.class_n[i])
            from_read[name] = div(self.read_sum[..., i], c)
            from_all[name] = div(self.all_sum[..., i], c)
            counts[name] = int(c)
        return AttentionStats(
            from_read=from_read, from_all=from_all,
            entropy=(self.ent_sum / self.n).float(), entropy_read=(self.ent_read_sum / self.n).float(),
            prev_token=div(self.prev_sum, self.prev_n), next_token=div(self.next_sum, self.next_n),
            duplicate_token=None if self.dup_sum is None else div(self.dup_sum, self.dup_n),
            alignment=None if self.align_sum is None else div(self.align_sum, self.align_n),
            class_counts=counts, shortcut=shortcut, n_examples=self.n, split=split, backbone=backbone,
        )


def _new_stats(model, data: _Data) -> _HeadStats:
    tc = data.split.token_classes
    text = not data.image
    return _HeadStats(n_layers(model), n_heads(model), data.class_names, is_causal(model),
                      alignment=text and "premise" in tc and "hypothesis" in tc, tokens=text)


def _update_stats(stats: _HeadStats, model, data: _Data, idx: slice, acts: Mapping[Site, Tensor]) -> Tensor:
    """Feed one batch's patterns into ``stats``; returns the patterns ``[b L H q k]``."""
    pattern = _patterns(acts, stats.L)
    dev, P = pattern.device, pattern.shape[-1]
    real = _real_positions(data, idx, P, dev)
    classes = position_masks(_class_stack(data, idx).to(dev), P)
    tokens = None if data.image else data.split.inputs[idx].to(dev)
    tc = data.split.token_classes
    premise = hypothesis = None
    if stats.align_sum is not None:
        premise, hypothesis = tc["premise"][idx].to(dev).bool(), tc["hypothesis"][idx].to(dev).bool()
    stats.update(pattern, real, _read_index(model, real), classes, tokens, premise, hypothesis)
    return pattern


def attention_stats(model, task_or_split: Task | Split, *, split: str = "ood_test", n: Optional[int] = 512,
                    batch_size: int = 64, shortcut: Any = None, seed: int = 0) -> AttentionStats:
    """Per-head attention statistics of ``model``, streamed over ``n`` examples of a task split.

    Args:
        model: a native encoder (or causal model), BERT or ViT bridge.
        task_or_split: a :class:`Task` (``split`` picks the split) or a :class:`Split`.
        n: examples to read (a deterministic random subset, ``seed``); None = all.
        shortcut: the shortcut token class(es); default: the task's
            ``info["shortcut_token_classes"]`` or the token classes named after its bias types.

    Returns:
        :class:`AttentionStats` with ``[layer head]`` tensors (see there for each statistic).
    """
    data = _prepare(task_or_split, split, n, shortcut, seed)
    _check_inputs(model, data, "model")
    stats = _new_stats(model, data)
    sites = _pattern_sites(model)
    for idx in _batches(data, batch_size):
        _update_stats(stats, model, data, idx, _run_batch(model, data, idx, sites))
    return stats.result(data.shortcut, data.split_name, backbone_of(model))

