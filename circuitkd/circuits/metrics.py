"""Metrics a circuit method optimises: ``metric(logits, pairs) -> Float[batch]`` (one number per example).

The default is the logit difference between ``pairs.clean_answer`` and
``pairs.corrupt_answer`` read at ``pairs.position`` (for a causal model with padding,
position -1 means each example's last real token). ACDC's KL criterion (Conmy et al.
2023) compares the read-out distribution with the full model's.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from circuitkd.errors import CircuitKDError
from circuitkd.types import PromptPairs

Metric = Callable[[Tensor, PromptPairs], Tensor]


def read_logits(logits: Tensor, pairs: PromptPairs) -> Float[Tensor, "batch n_classes"]:
    """The logits the task reads: ``[batch, n_classes]`` as is, ``[batch, pos, d_vocab]`` at ``pairs.position``."""
    if logits.dim() == 2:
        return logits
    if logits.dim() != 3:
        raise CircuitKDError(f"cannot read logits of shape {tuple(logits.shape)}")
    pos = pairs.position
    if pos == -1 and pairs.attention_mask is not None:
        last = pairs.attention_mask.long().sum(1) - 1
        return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]
    if not -logits.shape[1] <= pos < logits.shape[1]:
        raise CircuitKDError(f"read position {pos} is outside the {logits.shape[1]} positions of the input")
    return logits[:, pos]


def logit_diff(logits: Tensor, pairs: PromptPairs) -> Float[Tensor, " batch"]:
    """``logit[clean_answer] - logit[corrupt_answer]`` per example (the default metric)."""
    read = read_logits(logits, pairs)
    n_out = read.shape[-1]
    for name in ("clean_answer", "corrupt_answer"):
        ans = getattr(pairs, name)
        if int(ans.max()) >= n_out or int(ans.min()) < 0:
            raise CircuitKDError(f"pairs.{name} holds ids outside the model's {n_out} outputs")
    idx = torch.arange(read.shape[0], device=read.device)
    return read[idx, pairs.clean_answer.to(read.device)] - read[idx, pairs.corrupt_answer.to(read.device)]


def kl_from(reference_logits: Tensor) -> Metric:
    """``KL(reference || model)`` of the read-out distribution, per example (lower is closer).

    ``reference_logits`` are the full model's logits on the same (clean) inputs.
    """
    def kl(logits: Tensor, pairs: PromptPairs) -> Tensor:
        ref = torch.log_softmax(read_logits(reference_logits, pairs).float(), -1)
        cur = torch.log_softmax(read_logits(logits, pairs).float(), -1)
        reps = cur.shape[0] // ref.shape[0]
        ref = ref.repeat(reps, 1)
        return (ref.exp() * (ref - cur)).sum(-1)

    return kl


def resolve_metric(metric: Optional[Metric]) -> Metric:
    if metric is None:
        return logit_diff
    if not callable(metric):
        raise CircuitKDError(f"metric must be a callable (logits, pairs) -> Float[batch], got {type(metric).__name__}")
    return metric


def evaluate_metric(metric: Metric, logits: Tensor, pairs: PromptPairs) -> Tensor:
    """Run ``metric`` and check it returns one number per example."""
    out = metric(logits, pairs)
    if not isinstance(out, Tensor) or out.shape != (logits.shape[0],):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise CircuitKDError(f"metric must return Float[batch] with batch={logits.shape[0]}, got {shape}")
    return out
