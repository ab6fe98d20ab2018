"""What the attention analyses share: the prepared data (inputs, token-class masks, the shortcut's
classes), batching, the read-out and real positions, and the pattern sites of a model."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from circuitkd.data.task import Split, Task
from circuitkd.engine import run
from circuitkd.errors import CircuitKDError
from circuitkd.hooks import Site, backbone_of, is_causal, n_layers

#: Name of the union of the shortcut token classes in every statistic.

#: Name of the union of the shortcut token classes in every statistic.
SHORTCUT = "shortcut"

MATCHINGS = ("hungarian", "greedy")

SIMILARITIES = ("js", "corr")

_LN2 = math.log(2.0)

def head_name(layer: int, head: int) -> str:
    """``"L.H"``, the way heads are named in every report."""
    return f"{layer}.{head}"


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


def patch_grid(n_pos: int, height: int, width: int) -> tuple[int, int]:
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
    rows, cols = patch_grid(n_pos, height, width)
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


def _top(table: Tensor, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` largest entries of a ``[layer head]`` table (NaN last): ``[(layer, head, value)]``."""
    flat = table.flatten()
    order = torch.argsort(flat.nan_to_num(float("-inf")), descending=True, stable=True)[: max(0, k)]
    H = table.shape[1]
    return [(int(i) // H, int(i) % H, float(flat[i])) for i in order]


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

