"""Attention statistics, shortcut heads, and teacher-vs-student head matching and CKA.

Three tools trace a distilled student's lost robustness to attention:

- **Per-head attention statistics**, streamed over a dataset in the manner of Clark et al.
  2019, "What Does BERT Look At? An Analysis of BERT's Attention": the attention mass each
  head sends from the read-out position (CLS) and from every position to each token class
  the task marks (overlap, negation and cue words, premise vs hypothesis; for images the
  coloured patches), the entropy of its attention, premise↔hypothesis alignment (a
  hypothesis token attending to the same word in the premise) and previous-, next- and
  duplicate-token scores.
- **Shortcut heads**: heads ranked by their attention to the shortcut tokens and confirmed
  causally — each head's ``z`` is mean-ablated on the bias-conflicting examples (all heads
  at once, as copies stacked in the batch dimension) and, where the task can draw
  counterfactual pairs, activation-patched with :func:`circuitkd.patching.patch`.
- **Teacher vs student**: every pair of heads is compared by the similarity of their
  patterns on the same inputs (1 − Jensen–Shannon divergence / ln 2, or the Pearson
  correlation of the patterns), student heads are matched to teacher heads one-to-one with
  the Hungarian method (Kuhn 1955, "The Hungarian Method for the Assignment Problem";
  rectangular when the head counts differ) or greedily, and residual streams are compared
  layer by layer with linear CKA (Kornblith et al. 2019, "Similarity of Neural Network
  Representations Revisited"), which handles different widths.

Everything is a streaming reduction over batches run by :func:`circuitkd.engine.run`:
memory does not grow with the number of examples.

Example::

    diff = ckd.diff_attention(teacher, student, task)
    print("\\n".join(diff.summary()))
    diff.matching[0]        # ((student layer, head), (teacher layer, head), similarity)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from circuitkd.data.task import Split, Task
from circuitkd.engine import model_device, run
from circuitkd.errors import CircuitKDError
from circuitkd.hooks import Site, backbone_of, hook_name, is_causal, n_heads, n_layers

#: Name of the union of the shortcut token classes in every statistic.
SHORTCUT = "shortcut"
MATCHINGS = ("hungarian", "greedy")
SIMILARITIES = ("js", "corr")
_LN2 = math.log(2.0)


def head_name(layer: int, head: int) -> str:
    """``"L.H"``, the way heads are named in every report."""
    return f"{layer}.{head}"


# ============================================================================ inputs


@dataclass
class _Data:
    """The examples an analysis reads, with their token-class masks and shortcut classes."""

    split: Split
    shortcut: tuple[str, ...]
    bias_of_class: dict[str, Optional[str]]
    task: Optional[Task]
    split_name: Optional[str]
    index: Tensor  # positions of the examples in the original split

    @property
    def image(self) -> bool:
        return self.split.inputs.is_floating_point()

    @property
    def class_names(self) -> list[str]:
        """Every token class, then the shortcut union (always last)."""
        return [c for c in sorted(self.split.token_classes) if c != SHORTCUT] + [SHORTCUT]


def _subset(split: Split, n: Optional[int], seed: int) -> tuple[Split, Tensor]:
    """``n`` examples drawn without replacement (deterministic in ``seed``), in split order."""
    total = len(split)
    if n is None or n >= total:
        idx = torch.arange(total)
    else:
        if n < 1:
            raise CircuitKDError(f"n must be >= 1, got {n}")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(total, generator=g)[:n].sort().values
    return split.subset(idx), idx


def _bias_for(name: str, biases: Sequence[str]) -> Optional[str]:
    for b in biases:
        if name == b or name.startswith(b):
            return b
    return None


def _resolve_shortcut(split: Split, task: Optional[Task], shortcut: Any) -> tuple[tuple[str, ...], dict]:
    """The shortcut token classes: given, declared by the task, or the token classes named after its biases.

    A class matches a bias type when it has the bias' name or starts with it (bias
    ``"color"`` -> pixel class ``"colored"``).
    """
    known = sorted(split.token_classes)
    biases = list(task.bias_types) if task is not None else list(split.bias_labels)
    if shortcut is None and task is not None and task.info:
        shortcut = task.info.get("shortcut_token_classes")
    if shortcut is None:
        names = [c for b in biases for c in known if c == b] or [c for b in biases for c in known if c.startswith(b)]
        if not names:
            raise CircuitKDError(
                f"cannot tell which token classes are shortcuts: none of the token classes {known} is named "
                f"after a bias type {biases}; pass shortcut=<class name or list>"
            )
    else:
        names = [shortcut] if isinstance(shortcut, str) else list(shortcut)
        if not names:
            raise CircuitKDError(f"shortcut names no token class; known token classes: {known}")
    for name in names:
        if name not in split.token_classes:
            raise CircuitKDError(f"unknown token class {name!r}; this split marks {known}")
    names = list(dict.fromkeys(names))
    return tuple(names), {c: _bias_for(c, biases) for c in names}


def _prepare(task_or_split: Any, split: str, n: Optional[int], shortcut: Any, seed: int) -> _Data:
    if isinstance(task_or_split, Task):
        task, split_name = task_or_split, split
        whole = task.split(split)
    elif isinstance(task_or_split, Split):
        task, split_name, whole = None, None, task_or_split
    else:
        raise CircuitKDError(f"expected a Task or a Split, got {type(task_or_split).__name__}")
    if len(whole) == 0:
        raise CircuitKDError(f"split {split_name or ''!r} is empty")
    if not whole.token_classes:
        raise CircuitKDError("the split marks no token classes (Split.token_classes is empty)")
    names, bias_of = _resolve_shortcut(whole, task, shortcut)
    sub, idx = _subset(whole, n, seed)
    image = sub.inputs.is_floating_point()
    want = (len(sub),) + (tuple(sub.inputs.shape[-2:]) if image else (int(sub.inputs.shape[1]),))
    for name, m in sub.token_classes.items():
        if tuple(m.shape) != want:
            raise CircuitKDError(f"token class {name!r} has shape {tuple(m.shape)}; expected {want}")
    return _Data(sub, names, bias_of, task, split_name, idx)


def _batches(data: _Data, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise CircuitKDError(f"batch_size must be >= 1, got {batch_size}")
    n = len(data.split)
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _patch_grid(n_pos: int, height: int, width: int) -> tuple[int, int]:
    """``(rows, cols)`` of ViT patches for a pattern over ``n_pos`` positions (CLS + patches)."""
    for rows in range(1, height + 1):
        if height % rows:
            continue
        ph = height // rows
        if width % ph == 0 and rows * (width // ph) == n_pos - 1:
            return rows, width // ph
    raise CircuitKDError(
        f"cannot lay {n_pos - 1} square patches (plus CLS) over a {height}x{width} image"
    )


def position_masks(masks: Tensor, n_pos: int) -> Tensor:
    """Token-class masks at the model's attention positions: ``Bool[batch class pos]``.

    Text masks ``Bool[batch class pos]`` pass through. Pixel masks ``Bool[batch class height
    width]`` become patch masks for a ViT (position 0 = CLS, unmarked; patches in raster
    order): a patch is marked when any of its pixels is (its embedding sees the colour).
    """
    if masks.dim() == 3:
        if masks.shape[-1] != n_pos:
            raise CircuitKDError(f"token-class masks cover {masks.shape[-1]} positions, the pattern {n_pos}")
        return masks.bool()
    b, c, height, width = masks.shape
    rows, cols = _patch_grid(n_pos, height, width)
    ph, pw = height // rows, width // cols
    patches = masks.reshape(b, c, rows, ph, cols, pw).any(dim=5).any(dim=3).reshape(b, c, rows * cols)
    cls = torch.zeros(b, c, 1, dtype=torch.bool, device=masks.device)
    return torch.cat([cls, patches], dim=-1)


def _class_stack(data: _Data, idx: slice) -> Tensor:
    """``Bool[batch class ...]`` in :attr:`_Data.class_names` order (the last is the shortcut union)."""
    tc = data.split.token_classes
    masks = [tc[name][idx].bool() for name in data.class_names[:-1]]
    union = torch.zeros_like(tc[data.shortcut[0]][idx].bool())
    for name in data.shortcut:
        union = union | tc[name][idx].bool()
    return torch.stack(masks + [union], dim=1)


def _read_index(model, real: Tensor) -> Tensor:
    """``Int[batch]``: the read-out position (0 for encoders, the last real token for causal models)."""
    if is_causal(model):
        return real.long().sum(1) - 1
    return torch.zeros(real.shape[0], dtype=torch.long, device=real.device)


def _patterns(acts: Mapping[Site, Tensor], L: int) -> Float[Tensor, "batch layer head dest_pos src_pos"]:
    return torch.stack([acts[Site(layer, "pattern")] for layer in range(L)], dim=1).double()


def _real_positions(data: _Data, idx: slice, n_pos: int, device) -> Tensor:
    mask = data.split.attention_mask
    if mask is None:
        return torch.ones(idx.stop - idx.start, n_pos, dtype=torch.float64, device=device)
    return mask[idx].to(device=device, dtype=torch.float64)


def _run_batch(model, data: _Data, idx: slice, sites: Sequence[Site]) -> dict:
    split = data.split
    mask = None if split.attention_mask is None else split.attention_mask[idx]
    res = run(model, split.inputs[idx], attention_mask=mask, sites=sites, keep_logits=False,
              batch_size=idx.stop - idx.start)
    return res.acts


def _pattern_sites(model) -> list[Site]:
    return [Site(layer, "pattern") for layer in range(n_layers(model))]


# ============================================================================ statistics


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


def _top(table: Tensor, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` largest entries of a ``[layer head]`` table (NaN last): ``[(layer, head, value)]``."""
    flat = table.flatten()
    order = torch.argsort(flat.nan_to_num(float("-inf")), descending=True, stable=True)[: max(0, k)]
    H = table.shape[1]
    return [(int(i) // H, int(i) % H, float(flat[i])) for i in order]


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


# ============================================================================ similarity and CKA


def linear_cka(x: Float[Tensor, "n_x d_x"], y: Float[Tensor, "n_y d_y"]) -> float:
    """Linear CKA of two representations of the same ``n`` examples (Kornblith et al. 2019).

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc``:
    1 for identical representations, invariant to orthogonal transforms and isotropic scaling.
    """
    if x.shape[0] != y.shape[0]:
        raise CircuitKDError(f"linear_cka needs the same examples in both: {x.shape[0]} vs {y.shape[0]} rows")
    acc = _CKA(1, 1, x.shape[1], y.shape[1])
    acc.update([x], [y])
    return float(acc.result()[0, 0])


class _CKA:
    """Streaming linear CKA between every student layer and every teacher layer.

    Keeps ``sum x``, ``sum y``, ``X^T X``, ``Y^T Y`` and ``Y^T X`` (float64), so memory is
    fixed by the widths, not the number of examples.
    """

    def __init__(self, n_teacher: int, n_student: int, d_teacher: int, d_student: int):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.sx, self.sy = z(n_teacher, d_teacher), z(n_student, d_student)
        self.xx, self.yy = z(n_teacher, d_teacher, d_teacher), z(n_student, d_student, d_student)
        self.yx = z(n_student, n_teacher, d_student, d_teacher)
        self.n = 0

    def update(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        """``xs``: per teacher layer ``[rows d_teacher]``; ``ys``: per student layer ``[rows d_student]``."""
        X = torch.stack([x.double() for x in xs])  # [Lt rows dt]
        Y = torch.stack([y.double() for y in ys])
        self.sx += X.sum(1).cpu()
        self.sy += Y.sum(1).cpu()
        self.xx += torch.einsum("lni,lnj->lij", X, X).cpu()
        self.yy += torch.einsum("lni,lnj->lij", Y, Y).cpu()
        self.yx += torch.einsum("sni,tnj->stij", Y, X).cpu()
        self.n += int(X.shape[1])

    def result(self) -> Tensor:
        if self.n < 2:
            raise CircuitKDError(f"CKA needs at least 2 rows, got {self.n}")
        n = self.n
        mx, my = self.sx / n, self.sy / n
        cxx = self.xx - n * torch.einsum("li,lj->lij", mx, mx)
        cyy = self.yy - n * torch.einsum("li,lj->lij", my, my)
        cyx = self.yx - n * torch.einsum("si,tj->stij", my, mx)
        num = (cyx ** 2).sum((-2, -1))
        den = torch.linalg.matrix_norm(cyy)[:, None] * torch.linalg.matrix_norm(cxx)[None, :]
        return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num)).float()


class _PairSimilarity:
    """Streaming pattern similarity between every student head and every teacher head.

    JS: mean over real destinations and examples of the Jensen–Shannon divergence (nats)
    between the two heads' attention distributions. Correlation: Pearson over every
    (example, real destination, real source) entry, from running sums.
    """

    def __init__(self, n_student: int, n_teacher: int, chunk_elems: int = 1 << 22):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.js = z(n_student, n_teacher)
        self.sx, self.sxx, self.sy, self.syy = z(n_student), z(n_student), z(n_teacher), z(n_teacher)
        self.sxy = z(n_student, n_teacher)
        self.count = 0.0
        self.n = 0
        self.chunk_elems = chunk_elems

    def update(self, ps: Tensor, pt: Tensor, real: Tensor) -> None:
        """``ps`` [b S q k] student patterns, ``pt`` [b T q k] teacher patterns, ``real`` [b pos]."""
        b, S, P = ps.shape[0], ps.shape[1], ps.shape[-1]
        T = pt.shape[1]
        n_dest = real.sum(1)
        per = max(1, self.chunk_elems // max(1, b * S * P * P))
        hs = torch.xlogy(ps, ps).sum(-1)  # [b S q]: sum p log p
        ht = torch.xlogy(pt, pt).sum(-1)
        for lo in range(0, T, per):
            t = pt[:, lo:lo + per]
            m = (ps[:, :, None] + t[:, None]) / 2  # [b S Tc q k]
            js = 0.5 * (hs[:, :, None] - (ps[:, :, None] * torch.log(m.clamp_min(1e-300))).sum(-1)) \
                + 0.5 * (ht[:, None, lo:lo + per] - (t[:, None] * torch.log(m.clamp_min(1e-300))).sum(-1))
            js = js.clamp_min(0)
            self.js[:, lo:lo + per] += ((js * real[:, None, None]).sum(-1) / n_dest[:, None, None]).sum(0).cpu()
        w = real[:, :, None] * real[:, None, :]  # [b q k]
        xs, xt = ps * w[:, None], pt * w[:, None]
        self.sx += xs.sum((0, 2, 3)).cpu()
        self.sxx += (xs * ps).sum((0, 2, 3)).cpu()
        self.sy += xt.sum((0, 2, 3)).cpu()
        self.syy += (xt * pt).sum((0, 2, 3)).cpu()
        self.sxy += torch.einsum("bsqk,btqk->st", xs, pt).cpu()
        self.count += float(w.sum())
        self.n += b

    def js_divergence(self) -> Tensor:
        return (self.js / max(self.n, 1)).float()

    def correlation(self) -> Tensor:
        N = self.count
        cov = self.sxy - self.sx[:, None] * self.sy[None, :] / N
        vx = (self.sxx - self.sx ** 2 / N).clamp_min(0)
        vy = (self.syy - self.sy ** 2 / N).clamp_min(0)
        den = (vx[:, None] * vy[None, :]).sqrt()
        return torch.where(den > 1e-12, cov / den.clamp_min(1e-300), torch.zeros_like(cov)).float()


def match_heads(similarity: Tensor, *, method: str = "hungarian") -> tuple[list[tuple[int, int, float]], str]:
    """Match rows (student heads) to columns (teacher heads) by ``similarity`` (higher = closer).

    ``"hungarian"``: one-to-one, maximising total similarity (Kuhn 1955, via
    ``scipy.optimize.linear_sum_assignment``; rectangular when the counts differ, leaving the
    surplus heads of the larger model unmatched). ``"greedy"``: each row takes its most
    similar column (many-to-one). Returns ``([(row, column, similarity), ...], description)``.
    """
    if method not in MATCHINGS:
        raise CircuitKDError(f"unknown matching {method!r}; expected one of {MATCHINGS}")
    if similarity.dim() != 2 or similarity.numel() == 0:
        raise CircuitKDError(f"similarity must be a non-empty [student, teacher] matrix, got {tuple(similarity.shape)}")
    sim = similarity.double().cpu().numpy()
    S, T = sim.shape
    if method == "greedy":
        cols = sim.argmax(1)
        pairs = [(i, int(cols[i]), float(sim[i, cols[i]])) for i in range(S)]
        used = len(set(cols.tolist()))
        return pairs, (f"greedy (each student head to its most similar teacher head, many-to-one; "
                       f"{used} of {T} teacher heads used)")
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(np.nan_to_num(sim, nan=-1e9), maximize=True)
    pairs = sorted((int(r), int(c), float(sim[r, c])) for r, c in zip(rows, cols))
    if S <= T:
        note = f"one-to-one, {T - S} of {T} teacher heads unmatched"
    else:
        note = f"one-to-one, {S - T} of {S} student heads unmatched"
    return pairs, f"hungarian ({note})"


# ============================================================================ shortcut heads


class _PositionMean:
    """Streaming mean of a per-position activation over examples, counting only real positions.

    Result ``[pos ...]`` (zero where no example has a real token). A
    :class:`circuitkd.engine.Reducer`.
    """

    def __init__(self, site: Site):
        self.site = site
        self.sites = [site]
        self.total: Optional[Tensor] = None
        self.count: Optional[Tensor] = None

    def update(self, acts: Mapping[Site, Tensor], batch) -> None:
        act = acts[self.site].double()
        w = torch.ones(act.shape[:2], dtype=act.dtype, device=act.device) if batch.attention_mask is None \
            else batch.attention_mask.to(act.dtype)
        total = (act * w.reshape(w.shape + (1,) * (act.dim() - 2))).sum(0)
        count = w.sum(0)
        self.total = total if self.total is None else self.total + total
        self.count = count if self.count is None else self.count + count

    def result(self) -> Tensor:
        if self.total is None:
            raise CircuitKDError(f"mean of {self.site} saw no data")
        c = self.count.clamp_min(1).reshape(self.count.shape + (1,) * (self.total.dim() - 1))
        return (self.total / c).float()


def mean_z(model, inputs: Tensor, attention_mask: Optional[Tensor] = None, *, batch_size: int = 64) -> list[Tensor]:
    """Per layer, the mean ``z`` over examples at each real position: ``[pos head d_head]`` (mean-ablation values)."""
    L = n_layers(model)
    reducers = {str(layer): _PositionMean(Site(layer, "z")) for layer in range(L)}
    res = run(model, inputs, attention_mask=attention_mask, reducers=reducers, keep_logits=False,
              batch_size=batch_size)
    return [res.reduced[str(layer)] for layer in range(L)]


def _class_logits(model, out: Tensor, mask: Optional[Tensor]) -> Tensor:
    from circuitkd.models.build import select_class_logits

    return select_class_logits(model, out, mask)


def _ablation_hooks(model, means: Sequence[Tensor], copies: Tensor, B: int) -> list:
    """Edit hooks mean-ablating head ``copies[c]`` (flat ``layer*H + head``; -1 = none) in copy ``c``."""
    H = n_heads(model)
    hooks = []
    for layer in range(n_layers(model)):
        sel = ((copies // H) == layer) & (copies >= 0)
        if not bool(sel.any()):
            continue
        which = torch.nonzero(sel).flatten()
        heads = copies[which] % H

        def edit(act, *, hook, which=which, heads=heads, layer=layer):
            act = act.clone()
            view = act.view(-1, B, *act.shape[1:])  # [copies B pos head d_head]
            P = view.shape[2]
            value = means[layer][:P].to(act.device, act.dtype)  # [pos head d_head]
            w, h = which.to(act.device), heads.to(act.device)
            view[w, :, :, h] = value[:, h].permute(1, 0, 2)[:, None]
            return act

        hooks.append((hook_name(model, Site(layer, "z")), edit))
    return hooks


def ablate_heads(model, inputs: Tensor, attention_mask: Optional[Tensor], *, means: Sequence[Tensor],
                 heads: Optional[Sequence[int]] = None, batch_size: int = 64,
                 rows_per_forward: int = 1024) -> Tensor:
    """Class logits with each head mean-ablated in turn: ``Float[copy batch n_classes]``.

    Copy 0 is the unablated run; copy ``1 + i`` ablates flat head ``heads[i]``
    (``layer * n_heads + head``; default every head). The copies ride in the batch
    dimension of one hooked forward (chunked to ``rows_per_forward`` rows).
    """
    L, H = n_layers(model), n_heads(model)
    flat = torch.arange(L * H) if heads is None else torch.as_tensor(list(heads), dtype=torch.long)
    copies_all = torch.cat([torch.tensor([-1]), flat])
    n = int(inputs.shape[0])
    out = []
    device = model_device(model)
    for lo in range(0, n, batch_size):
        x = inputs[lo:lo + batch_size]
        m = None if attention_mask is None else attention_mask[lo:lo + batch_size]
        B = int(x.shape[0])
        per = max(1, rows_per_forward // B)
        chunks = []
        for c0 in range(0, len(copies_all), per):
            copies = copies_all[c0:c0 + per]
            N = len(copies)
            xs = x.repeat(N, *([1] * (x.dim() - 1)))
            ms = None if m is None else m.repeat(N, 1)
            res = run(model, xs, attention_mask=ms, fwd_hooks=_ablation_hooks(model, means, copies, B),
                      batch_size=N * B)
            logits = _class_logits(model, res.logits, None if ms is None else ms.to(device))
            chunks.append(logits.float().cpu().view(N, B, -1))
        out.append(torch.cat(chunks))
    return torch.cat(out, dim=1)


@dataclass
class ShortcutHeads:
    """Heads ranked by attention to shortcut tokens, with their causal effect on bias-conflicting examples.

    Attributes:
        attention: ``[layer head]`` attention from the read-out position to shortcut tokens.
        ablation_logit_diff: ``[layer head]`` change in the mean logit difference (gold label −
            the label the conflicting shortcut predicts) on bias-conflicting examples when the
            head's ``z`` is mean-ablated (positive: the head pushed towards the shortcut).
        ablation_acc: ``[layer head]`` change in accuracy on those examples.
        patching: ``[layer head]`` or None: with counterfactual shortcut pairs, the fraction
            of the output change caused by flipping the shortcut that patching this head alone
            restores (``circuitkd.patching.patch``, KL metric, denoising).
        base_logit_diff / base_acc: the unablated model on the conflicting examples.
        ranking: every head, most shortcut attention first: ``(layer, head, attention, Δlogit-diff, confirmed)``.
        min_effect: the threshold on ``|Δlogit-diff|`` (or the patching fraction) that confirms one of
            the ``k`` heads with the most shortcut attention.
    """

    attention: Tensor
    ablation_logit_diff: Tensor
    ablation_acc: Tensor
    patching: Optional[Tensor]
    base_logit_diff: float
    base_acc: float
    n_conflicting: int
    ranking: list[tuple[int, int, float, float, bool]]
    min_effect: float
    k: int = 5
    shortcut: tuple[str, ...] = ()

    @property
    def heads(self) -> list[tuple[int, int]]:
        """Confirmed shortcut heads ``(layer, head)``, most shortcut attention first."""
        return [(layer, head) for layer, head, _, _, ok in self.ranking if ok]

    def summary(self, k: int = 3) -> list[str]:
        lines = [f"bias-conflicting examples: {self.n_conflicting}, accuracy {self.base_acc:.3f}, "
                 f"logit diff (gold - shortcut label) {self.base_logit_diff:+.3f}"]
        for layer, head, att, eff, ok in self.ranking[:k]:
            patch = "" if self.patching is None else f", patching {float(self.patching[layer, head]):+.3f}"
            lines.append(f"  {head_name(layer, head)}: shortcut attention {att:.3f}, ablation Δlogit-diff {eff:+.3f}, "
                         f"Δacc {float(self.ablation_acc[layer, head]):+.3f}{patch}"
                         f"{' (confirmed)' if ok else ' (not confirmed)'}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "attention": self.attention.tolist(), "ablation_logit_diff": self.ablation_logit_diff.tolist(),
            "ablation_acc": self.ablation_acc.tolist(),
            "patching": None if self.patching is None else self.patching.tolist(),
            "base_logit_diff": self.base_logit_diff, "base_acc": self.base_acc, "n_conflicting": self.n_conflicting,
            "ranking": [list(r) for r in self.ranking], "min_effect": self.min_effect, "k": self.k,
            "shortcut": list(self.shortcut),
            "confirmed": [head_name(*h) for h in self.heads],
        }


def _conflict_labels(data: _Data) -> tuple[Tensor, Tensor]:
    """``(Bool[n] conflicting, Int[n] the label the conflicting shortcut predicts)`` for the shortcut classes."""
    split = data.split
    biases = [b for b in dict.fromkeys(data.bias_of_class.values()) if b is not None] or list(split.bias_labels)
    if not biases:
        raise CircuitKDError("the split has no bias annotations: cannot find bias-conflicting examples")
    conflicting = torch.zeros(len(split), dtype=torch.bool)
    bias_label = torch.full((len(split),), -1, dtype=torch.long)
    for b in biases:
        lab = split.bias_labels[b]
        new = (lab >= 0) & (lab != split.labels) & ~conflicting
        bias_label[new] = lab[new]
        conflicting |= new
    return conflicting, bias_label


def shortcut_heads(model, task: Task | Split, *, split: str = "ood_test", n: Optional[int] = 512,
                   batch_size: int = 64, shortcut: Any = None, k: int = 5, min_effect: float = 0.1,
                   confirm: str = "auto", pairs: Any = None, n_pairs: int = 256, seed: int = 0,
                   stats: Optional[AttentionStats] = None) -> ShortcutHeads:
    """Rank heads by attention to shortcut tokens and confirm them causally.

    Confirmation (``confirm``): "ablation" mean-ablates each head's ``z`` (means over the
    ``n`` examples) on the bias-conflicting ones, every head at once as stacked copies;
    "patching" also runs :func:`circuitkd.patching.patch` on counterfactual shortcut pairs
    (``pairs`` or ``task.counterfactual_pairs(n_pairs, flip="shortcut")``); "auto" adds
    patching when pairs are available.

    A shortcut head must both attend to shortcut tokens and matter: only the ``k`` heads with
    the most shortcut attention are candidates, and a candidate is confirmed when ``|Δlogit-diff|
    >= min_effect`` or its patching fraction is ``>= min_effect``.

    Returns:
        :class:`ShortcutHeads` (``.heads``: confirmed heads; ``.ranking``: every head, most
        shortcut attention first, with its effect).
    """
    if confirm not in ("auto", "ablation", "patching"):
        raise CircuitKDError(f"confirm must be 'auto', 'ablation' or 'patching', got {confirm!r}")
    data = _prepare(task, split, n, shortcut, seed)
    _check_inputs(model, data, "model")
    if stats is None:
        stats = attention_stats(model, data.split, n=None, batch_size=batch_size, shortcut=list(data.shortcut))
    attention = stats.shortcut_attention()
    conflicting, bias_label = _conflict_labels(data)
    n_conf = int(conflicting.sum())
    if n_conf == 0:
        raise CircuitKDError(f"no bias-conflicting examples for shortcut classes {list(data.shortcut)} "
                             f"in split {data.split_name!r}: cannot confirm shortcut heads causally "
                             "(diff_attention(..., confirm=False) skips it)")
    sp = data.split
    means = mean_z(model, sp.inputs, sp.attention_mask, batch_size=batch_size)
    conf = sp.subset(conflicting)
    logits = ablate_heads(model, conf.inputs, conf.attention_mask, means=means, batch_size=batch_size)
    gold, blab = conf.labels, bias_label[conflicting]
    ar = torch.arange(len(gold))
    ld = logits[:, ar, gold] - logits[:, ar, blab]  # [copy n]
    acc = (logits.argmax(-1) == gold).float()
    L, H = stats.n_layers, stats.n_heads
    d_ld = (ld[1:].mean(1) - ld[0].mean()).view(L, H)
    d_acc = (acc[1:].mean(1) - acc[0].mean()).view(L, H)
    patching = None
    want_patch = confirm == "patching" or (confirm == "auto" and (pairs is not None or (
        isinstance(task, Task) and task.pair_fn is not None)))
    if want_patch:
        if pairs is None:
            if not isinstance(task, Task):
                raise CircuitKDError("confirm='patching' needs pairs= or a Task that can draw counterfactual pairs")
            pairs = task.counterfactual_pairs(n=n_pairs, flip="shortcut", seed=seed)
        from circuitkd.patching import patch

        patching = patch(model, pairs, site="head", metric="kl", direction="denoise", batch_size=batch_size)
        patching = patching.float().cpu()
    ranking = []
    for rank, (layer, head, att) in enumerate(_top(attention, L * H)):
        eff = float(d_ld[layer, head])
        causal = abs(eff) >= min_effect or (patching is not None and float(patching[layer, head]) >= min_effect)
        ok = rank < k and causal
        ranking.append((layer, head, float(attention[layer, head]), eff, bool(ok)))
    return ShortcutHeads(attention=attention, ablation_logit_diff=d_ld, ablation_acc=d_acc, patching=patching,
                         base_logit_diff=float(ld[0].mean()), base_acc=float(acc[0].mean()), n_conflicting=n_conf,
                         ranking=ranking, min_effect=min_effect, k=k, shortcut=data.shortcut)


# ============================================================================ teacher vs student


@dataclass
class ExamplePatterns:
    """Both models' attention on one example, for the side-by-side figure.

    ``teacher``/``student``: ``[layer head dest_pos src_pos]``; ``labels``: one label per
    position; ``shortcut_positions``: positions of shortcut tokens (``shortcut_classes``: by
    shortcut class); ``length``: real positions; ``read_position``: where the class is read
    (0 for a CLS encoder); ``image``: ``[channel height width]`` pixels of an image example
    (positions are then CLS + patches in raster order), None for text.
    """

    index: int
    labels: list[str]
    teacher: Tensor
    student: Tensor
    shortcut_positions: list[int]
    length: int
    read_position: int = 0
    shortcut_classes: dict[str, list[int]] = field(default_factory=dict)
    image: Optional[Tensor] = None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "labels": self.labels, "teacher": self.teacher.tolist(),
                "student": self.student.tolist(), "shortcut_positions": self.shortcut_positions,
                "length": self.length, "read_position": self.read_position,
                "shortcut_classes": self.shortcut_classes,
                "image": None if self.image is None else self.image.tolist()}

    def readout_mass(self, model: str, head: tuple[int, int], positions: Optional[Sequence[int]] = None) -> float:
        """Attention of ``model``'s (``"teacher"`` or ``"student"``) ``head`` from the read-out
        position onto ``positions`` (the shortcut positions by default)."""
        if model not in ("teacher", "student"):
            raise CircuitKDError(f"model must be 'teacher' or 'student', got {model!r}")
        pattern = self.teacher if model == "teacher" else self.student
        where = sorted(set(self.shortcut_positions if positions is None else positions))
        return float(pattern[head[0], head[1], self.read_position, where].sum())


@dataclass
class AttentionDiff:
    """Teacher vs student attention on the same inputs (see :func:`diff_attention`).

    Attributes:
        teacher, student: :class:`AttentionStats` of each model (``[layer head]`` tensors by token class).
        similarity: ``[student head, teacher head]`` (flat ``layer * n_heads + head``) used for matching.
        js: ``[student head, teacher head]`` Jensen–Shannon divergence (nats, 0..ln 2).
        corr: ``[student head, teacher head]`` pattern correlation.
        matching: ``[((student layer, head), (teacher layer, head), similarity), ...]``.
        matching_method: how the heads were matched, e.g. "hungarian (one-to-one, 8 of 16 teacher heads unmatched)".
        cka: ``[student layer, teacher layer]`` linear CKA of the residual streams after each block.
        shortcut_change: per matched pair, student − teacher attention from the read-out position to
            shortcut tokens; ``shortcut_change_by_class`` the same for each shortcut class.
        teacher_heads, student_heads: :class:`ShortcutHeads` when confirmation was run.
        example: both models' patterns on one bias-conflicting example.
    """

    teacher: AttentionStats
    student: AttentionStats
    similarity: Tensor
    similarity_kind: str
    js: Tensor
    corr: Tensor
    matching: list[tuple[tuple[int, int], tuple[int, int], float]]
    matching_method: str
    cka: Tensor
    shortcut_change: Tensor
    shortcut_change_by_class: dict[str, Tensor]
    teacher_heads: Optional[ShortcutHeads] = None
    student_heads: Optional[ShortcutHeads] = None
    example: Optional[ExamplePatterns] = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shortcut(self) -> tuple[str, ...]:
        return self.teacher.shortcut

    def summary(self, k: int = 3) -> list[str]:
        """Readable findings naming heads "L.H" with their numbers."""
        t, s = self.teacher, self.student
        lines = [
            f"teacher {t.n_layers}x{t.n_heads} heads ({t.backbone}), student {s.n_layers}x{s.n_heads} heads "
            f"({s.backbone}); split {t.split}, {t.n_examples} examples; shortcut tokens: {', '.join(self.shortcut)}",
        ]
        for name, st, heads in (("teacher", t, self.teacher_heads), ("student", s, self.student_heads)):
            top = ", ".join(f"{head_name(la, h)} {v:.3f}" for la, h, v in st.top_heads(k))
            lines.append(f"{name} top shortcut heads (CLS -> shortcut mass): {top}")
            for cls in self.shortcut:
                la, h, v = st.top_heads(1, cls)[0]
                lines.append(f"  {name} {cls}: strongest head {head_name(la, h)} {v:.3f}, "
                             f"mean over heads {float(st.from_read[cls].nanmean()):.3f}")
            if heads is not None:
                conf = ", ".join(f"{head_name(la, h)} Δlogit-diff {e:+.3f}" for la, h, _, e, ok in heads.ranking if ok)
                lines.append(f"  {name} confirmed by ablation on {heads.n_conflicting} bias-conflicting examples "
                             f"(top {heads.k} by attention, |Δ| >= {heads.min_effect}): {conf or 'none'}")
        ts, ss = t.shortcut_attention(), s.shortcut_attention()
        t_mean, s_mean = float(ts.nanmean()), float(ss.nanmean())
        t_max, s_max = float(ts.nan_to_num(-1).max()), float(ss.nan_to_num(-1).max())
        verdict = "higher" if s_mean > t_mean else "lower" if s_mean < t_mean else "equal"
        lines.append(f"shortcut attention, mean over heads: teacher {t_mean:.3f}, student {s_mean:.3f} "
                     f"(student {verdict}, {s_mean - t_mean:+.3f}); max: teacher {t_max:.3f}, student {s_max:.3f}")
        lines.append(f"head matching: {self.matching_method}, by "
                     f"{'1 - JS/ln2' if self.similarity_kind == 'js' else 'pattern correlation'}; "
                     f"mean similarity {float(np.mean([m[2] for m in self.matching])):.3f}")
        order = sorted(range(len(self.matching)), key=lambda i: -abs(float(self.shortcut_change[i])))
        for i in order[:k]:
            (sl, sh), (tl, th), sim = self.matching[i]
            tv, sv = float(t.shortcut_attention()[tl, th]), float(s.shortcut_attention()[sl, sh])
            lines.append(f"  student {head_name(sl, sh)} <-> teacher {head_name(tl, th)} (similarity {sim:.3f}): "
                         f"shortcut attention {tv:.3f} -> {sv:.3f} ({sv - tv:+.3f})")
        best = self.cka.argmax(1)
        cka = ", ".join(f"student L{i} ~ teacher L{int(j)} {float(self.cka[i, j]):.3f}" for i, j in enumerate(best))
        lines.append(f"linear CKA of residual streams (best teacher layer per student layer): {cka}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher.to_dict(), "student": self.student.to_dict(),
            "similarity": self.similarity.tolist(), "similarity_kind": self.similarity_kind,
            "js": self.js.tolist(), "corr": self.corr.tolist(),
            "matching": [{"student": head_name(*s), "teacher": head_name(*t), "similarity": sim}
                         for s, t, sim in self.matching],
            "matching_method": self.matching_method, "cka": self.cka.tolist(),
            "shortcut_change": self.shortcut_change.tolist(),
            "shortcut_change_by_class": {k: v.tolist() for k, v in self.shortcut_change_by_class.items()},
            "teacher_heads": None if self.teacher_heads is None else self.teacher_heads.to_dict(),
            "student_heads": None if self.student_heads is None else self.student_heads.to_dict(),
            "example": None if self.example is None else self.example.to_dict(),
            "summary": self.summary(), "info": self.info,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON of every number (and the summary); written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text


def _model_n_classes(model) -> Optional[int]:
    spec = getattr(model, "circuitkd_spec", None)
    if spec is not None and spec.n_classes is not None:
        return int(spec.n_classes)
    return None


def _check_inputs(model, data: _Data, role: str) -> None:
    backbone = backbone_of(model)
    if data.image != (backbone == "vit"):
        kind = "images" if data.image else "token ids"
        raise CircuitKDError(f"the {role} ({backbone}) cannot read this split's inputs ({kind})")
    if not data.image:
        d_vocab = int(model.cfg.d_vocab)
        top = int(data.split.inputs.max())
        if top >= d_vocab:
            raise CircuitKDError(f"the {role} has a vocabulary of {d_vocab} tokens but the inputs use token id {top}: "
                                 "was it trained on another task?")
    if data.task is not None:
        n_cls = _model_n_classes(model)
        mapping = data.task.info.get("prediction_map") if data.task.info else None
        expected = len(mapping) if mapping is not None else data.task.n_classes
        if n_cls is not None and n_cls != expected:
            raise CircuitKDError(f"the {role} has {n_cls} classes but task {data.task.name!r} has {expected}")


def _check_pair(teacher, student, data: _Data) -> None:
    _check_inputs(teacher, data, "teacher")
    _check_inputs(student, data, "student")
    t_cls, s_cls = _model_n_classes(teacher), _model_n_classes(student)
    if t_cls is not None and s_cls is not None and t_cls != s_cls:
        raise CircuitKDError(f"teacher and student were trained on different tasks: {t_cls} vs {s_cls} classes")
    if not data.image and int(teacher.cfg.d_vocab) != int(student.cfg.d_vocab):
        raise CircuitKDError(f"teacher and student have different vocabularies: {int(teacher.cfg.d_vocab)} vs "
                             f"{int(student.cfg.d_vocab)} tokens (trained on different tasks?)")


def _resid(acts: Mapping[Site, Tensor], L: int, real: Tensor, read: Optional[Tensor]) -> list[Tensor]:
    """Per layer, the residual rows CKA compares: every real position, or the read-out position."""
    out = []
    for layer in range(L):
        r = acts[Site(layer, "resid_post")]
        real, read = real.to(r.device), None if read is None else read.to(r.device)
        if read is not None:
            out.append(r[torch.arange(r.shape[0], device=r.device), read])
        else:
            out.append(r.reshape(-1, r.shape[-1])[real.reshape(-1) > 0])
    return out


def _position_labels(data: _Data, i: int, n_pos: int) -> list[str]:
    if data.image:
        return ["CLS"] + [f"p{j}" for j in range(n_pos - 1)]
    ids = data.split.inputs[i, :n_pos].tolist()
    tok = getattr(data.task, "tokenizer", None) if data.task is not None else None
    if tok is not None and hasattr(tok, "convert_ids_to_tokens"):
        try:
            return [f"{j}:{w}" for j, w in enumerate(tok.convert_ids_to_tokens(ids))]
        except Exception:  # noqa: BLE001 - a foreign tokenizer that cannot decode: fall back to ids
            pass
    return [f"{j}:{t}" for j, t in enumerate(ids)]


def _example(teacher, student, data: _Data) -> ExamplePatterns:
    conflicting = _conflict_labels(data)[0] if data.split.bias_labels else torch.zeros(len(data.split), dtype=torch.bool)
    union = _class_stack(data, slice(0, len(data.split)))[:, -1].flatten(1).any(-1)
    candidates = torch.nonzero(conflicting & union).flatten()
    if len(candidates) == 0:
        candidates = torch.nonzero(union).flatten()
    i = int(candidates[0]) if len(candidates) else 0
    idx = slice(i, i + 1)
    pt = _patterns(_run_batch(teacher, data, idx, _pattern_sites(teacher)), n_layers(teacher))[0]
    ps = _patterns(_run_batch(student, data, idx, _pattern_sites(student)), n_layers(student))[0]
    P = pt.shape[-1]
    length = P if data.split.attention_mask is None else int(data.split.attention_mask[i].sum())
    classes = position_masks(_class_stack(data, idx), P)[0]
    shortcut = classes[-1]
    by_class = {name: [j for j in range(length) if bool(classes[data.class_names.index(name), j])]
                for name in data.shortcut}
    real = torch.zeros(1, P)
    real[0, :length] = 1
    return ExamplePatterns(index=int(data.index[i]), labels=_position_labels(data, i, P)[:length],
                           teacher=pt[..., :length, :length].float().cpu(),
                           student=ps[..., :length, :length].float().cpu(),
                           shortcut_positions=[j for j in range(length) if bool(shortcut[j])], length=length,
                           read_position=int(_read_index(student, real)[0]), shortcut_classes=by_class,
                           image=data.split.inputs[i].float().cpu().clone() if data.image else None)


def diff_attention(teacher, student, task: Task | Split, *, split: str = "ood_test", n: Optional[int] = 512,
                   batch_size: int = 64, matching: str = "hungarian", similarity: str = "js",
                   shortcut: Any = None, confirm: bool = True, cka_positions: str = "all",
                   seed: int = 0) -> AttentionDiff:
    """Compare a teacher's and a student's attention on the same ``n`` examples.

    One streaming pass over the data runs both models on each batch and accumulates each
    model's :class:`AttentionStats`, the pattern similarity of every (student head, teacher
    head) pair, and linear CKA between every pair of layers' residual streams. Heads are then
    matched (``matching``: "hungarian" one-to-one, or "greedy" many-to-one) by
    ``similarity`` ("js": 1 − JS/ln 2; "corr": pattern correlation). With ``confirm``, each
    model's shortcut heads are confirmed by mean-ablation (:func:`shortcut_heads`, no patching).

    Teacher and student may differ in depth, width and head count; they must read the same
    inputs (same vocabulary, same number of attention positions).

    Args:
        cka_positions: "all" (every real token is a CKA row) or "read" (the read-out position only).

    Returns:
        :class:`AttentionDiff` (``.summary()`` for readable lines, ``.to_json()`` for the numbers).
    """
    if similarity not in SIMILARITIES:
        raise CircuitKDError(f"unknown similarity {similarity!r}; expected one of {SIMILARITIES}")
    if matching not in MATCHINGS:
        raise CircuitKDError(f"unknown matching {matching!r}; expected one of {MATCHINGS}")
    if cka_positions not in ("all", "read"):
        raise CircuitKDError(f"cka_positions must be 'all' or 'read', got {cka_positions!r}")
    data = _prepare(task, split, n, shortcut, seed)
    _check_pair(teacher, student, data)
    Lt, Ht, Ls, Hs = n_layers(teacher), n_heads(teacher), n_layers(student), n_heads(student)
    t_stats, s_stats = _new_stats(teacher, data), _new_stats(student, data)
    sim = _PairSimilarity(Ls * Hs, Lt * Ht)
    cka = _CKA(Lt, Ls, int(teacher.cfg.d_model), int(student.cfg.d_model))
    t_sites = _pattern_sites(teacher) + [Site(layer, "resid_post") for layer in range(Lt)]
    s_sites = _pattern_sites(student) + [Site(layer, "resid_post") for layer in range(Ls)]
    for idx in _batches(data, batch_size):
        t_acts = _run_batch(teacher, data, idx, t_sites)
        s_acts = _run_batch(student, data, idx, s_sites)
        pt = _update_stats(t_stats, teacher, data, idx, t_acts)
        ps = _update_stats(s_stats, student, data, idx, s_acts)
        if pt.shape[-1] != ps.shape[-1]:
            raise CircuitKDError(f"teacher and student attend over different positions ({pt.shape[-1]} vs "
                                 f"{ps.shape[-1]}): patterns cannot be compared")
        dev, P = pt.device, pt.shape[-1]
        real = _real_positions(data, idx, P, dev)
        sim.update(ps.to(dev).flatten(1, 2), pt.flatten(1, 2), real)
        by_read = cka_positions == "read"
        xs = _resid(t_acts, Lt, real, _read_index(teacher, real) if by_read else None)
        ys = _resid(s_acts, Ls, real, _read_index(student, real) if by_read else None)
        cka.update(xs, [y.to(dev) for y in ys])
    t_res = t_stats.result(data.shortcut, data.split_name, backbone_of(teacher))
    s_res = s_stats.result(data.shortcut, data.split_name, backbone_of(student))
    js, corr = sim.js_divergence(), sim.correlation()
    score = 1.0 - js / _LN2 if similarity == "js" else corr
    flat_pairs, method = match_heads(score, method=matching)
    pairs = [((i // Hs, i % Hs), (j // Ht, j % Ht), s) for i, j, s in flat_pairs]

    def change(cls: str) -> Tensor:
        tv, sv = t_res.shortcut_attention(cls), s_res.shortcut_attention(cls)
        return torch.tensor([float(sv[s]) - float(tv[t]) for s, t, _ in pairs])

    teacher_heads = student_heads = None
    if confirm:
        teacher_heads = shortcut_heads(teacher, data.split, n=None, batch_size=batch_size,
                                       shortcut=list(data.shortcut), confirm="ablation", stats=t_res)
        student_heads = shortcut_heads(student, data.split, n=None, batch_size=batch_size,
                                       shortcut=list(data.shortcut), confirm="ablation", stats=s_res)
    return AttentionDiff(
        teacher=t_res, student=s_res, similarity=score, similarity_kind=similarity, js=js, corr=corr,
        matching=pairs, matching_method=method, cka=cka.result(), shortcut_change=change(SHORTCUT),
        shortcut_change_by_class={c: change(c) for c in data.shortcut},
        teacher_heads=teacher_heads, student_heads=student_heads, example=_example(teacher, student, data),
        info={"split": data.split_name, "n": len(data.split), "seed": seed, "matching": matching,
              "similarity": similarity, "cka_positions": cka_positions, "shortcut": list(data.shortcut),
              "teacher_shape": [Lt, Ht, int(teacher.cfg.d_model)], "student_shape": [Ls, Hs, int(student.cfg.d_model)]},
    )
