"""The small value types shared across circuitkd: the patch :class:`Direction`, circuit
:class:`Node` and :class:`Edge`, and :class:`PromptPairs`.

One vocabulary of dimension names is used on every public signature (jaxtyping):
``batch pos d_model d_vocab layer head dest_pos src_pos n_classes``.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch
from torch import Tensor

from circuitkd.errors import CircuitKDError


class Direction(str, Enum):
    """Which way a patch moves activations, in patching and circuit discovery alike.

    ``DENOISE``: the corrupt run receives clean activations (is a component *sufficient*?);
    ``NOISE``: the clean run receives corrupt ones (is it *necessary*?) — Heimersheim & Nanda 2024.
    """

    DENOISE = "denoise"
    NOISE = "noise"

    @classmethod
    def parse(cls, value: "Direction | str") -> "Direction":
        """``value`` as a :class:`Direction`; :class:`CircuitKDError` naming the two choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise CircuitKDError(f"direction must be 'denoise' or 'noise', got {value!r}") from None


@dataclass(frozen=True, order=True)
class Node:
    """A component of a model's computational graph: the embedding, a head, an MLP or the output."""

    kind: str
    layer: Optional[int] = None
    head: Optional[int] = None

    def __str__(self) -> str:
        if self.kind == "head":
            return f"{self.layer}.{self.head}"
        if self.kind == "mlp":
            return f"mlp{self.layer}"
        return self.kind


@dataclass(frozen=True, order=True)
class Edge:
    """A path from ``src``'s output into ``dst``'s input at ``port`` (q/k/v for heads, in otherwise)."""

    src: Node
    dst: Node
    port: str = "in"

    def __str__(self) -> str:
        port = f"<{self.port}>" if self.port != "in" else ""
        return f"{self.src}->{self.dst}{port}"


@dataclass
class PromptPairs:
    """Clean/corrupt inputs of one shape, with the answers each should get.

    Attributes:
        clean: ``Int[batch pos]`` token ids, or ``Float[batch channel height width]`` pixels.
        corrupt: same shape and dtype as ``clean``.
        attention_mask: ``Int[batch pos]`` (1 = real token), shared by clean and corrupt, or None.
        position: the position the output is read at (0 for a CLS classifier, -1 for a causal model).
        clean_answer: ``Int[batch]`` class (or token) id the clean input should get.
        corrupt_answer: ``Int[batch]`` class (or token) id the corrupt input should get.
        meta: free-form per-pair information (e.g. which shortcut was flipped).
    """

    clean: Tensor
    corrupt: Tensor
    clean_answer: Tensor
    corrupt_answer: Tensor
    attention_mask: Optional[Tensor] = None
    position: int = 0
    meta: Optional[dict] = None

    def __post_init__(self) -> None:
        if self.clean.shape != self.corrupt.shape:
            detail = ""
            if self.clean.dim() == 2 and self.corrupt.dim() == 2 and self.clean.shape[0] == self.corrupt.shape[0]:
                detail = f": {self.clean.shape[1]} vs {self.corrupt.shape[1]} tokens"
            raise CircuitKDError(
                f"clean and corrupt differ in shape{detail} "
                f"(clean {tuple(self.clean.shape)}, corrupt {tuple(self.corrupt.shape)})"
            )
        for name in ("clean", "corrupt"):
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise CircuitKDError(f"{name} must be a tensor of token ids or pixels, got {type(value).__name__}")
            if value.dtype == torch.bool or value.is_complex():
                raise CircuitKDError(f"{name} must hold integer token ids or float pixels, got dtype {value.dtype}")
            if value.dim() == 0:
                raise CircuitKDError(f"{name} must be [batch pos] token ids or [batch channel height width] pixels, "
                                     "got a scalar")
            if not value.is_floating_point() and value.dtype != torch.long:
                # uint8 ids would index an embedding as a boolean mask; every integer dtype becomes long ids.
                value = value.long()
                setattr(self, name, value)
            if value.numel() == 0:
                continue
            if value.is_floating_point():
                if not bool(torch.isfinite(value).all()):
                    raise CircuitKDError(f"{name} pixels hold non-finite values (NaN or inf)")
            elif int(value.min()) < 0:
                raise CircuitKDError(f"{name} holds negative token id {int(value.min())}")
        if self.clean.is_floating_point() != self.corrupt.is_floating_point():
            raise CircuitKDError(f"clean and corrupt must both be token ids or both pixels, got dtypes "
                                 f"{self.clean.dtype} and {self.corrupt.dtype}")
        n = self.clean.shape[0]
        for name in ("clean_answer", "corrupt_answer"):
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                try:
                    value = torch.as_tensor(value)
                except (TypeError, ValueError, RuntimeError) as exc:
                    raise CircuitKDError(f"{name} must be integer class ids, got {value!r}") from exc
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise CircuitKDError(f"{name} must hold integer class (or token) ids, got dtype {value.dtype}")
            value = value.long()
            setattr(self, name, value)
            if value.shape != (n,):
                raise CircuitKDError(
                    f"{name} must have one entry per pair: expected shape ({n},), got {tuple(value.shape)}"
                )
            if value.numel() and int(value.min()) < 0:
                raise CircuitKDError(f"{name} holds negative class id {int(value.min())}")
        if self.attention_mask is not None:
            if self.clean.dim() != 2 or self.attention_mask.shape != self.clean.shape:
                raise CircuitKDError(
                    f"attention_mask shape {tuple(self.attention_mask.shape)} does not match "
                    f"clean tokens {tuple(self.clean.shape)}"
                )

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    def __getitem__(self, idx) -> "PromptPairs":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        meta = None
        if self.meta is not None:
            meta = {k: (v[idx] if isinstance(v, Tensor) else v) for k, v in self.meta.items()}
        return PromptPairs(
            clean=self.clean[idx],
            corrupt=self.corrupt[idx],
            clean_answer=self.clean_answer[idx],
            corrupt_answer=self.corrupt_answer[idx],
            attention_mask=None if self.attention_mask is None else self.attention_mask[idx],
            position=self.position,
            meta=meta,
        )

    def repeat(self, copies: int) -> "PromptPairs":
        """The pairs ``copies`` times over, copy-major (row ``k * len(self) + b`` is pair ``b``): the
        layout of patched copies stacked in the batch dimension."""
        if copies == 1:
            return self
        return self[torch.arange(len(self)).repeat(copies)]

    def to(self, device: torch.device | str) -> "PromptPairs":
        """A copy with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PromptPairs(
            clean=move(self.clean),
            corrupt=move(self.corrupt),
            clean_answer=move(self.clean_answer),
            corrupt_answer=move(self.corrupt_answer),
            attention_mask=move(self.attention_mask),
            position=self.position,
            meta=self.meta,
        )
