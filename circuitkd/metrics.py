"""Metrics over a model's logits on :class:`PromptPairs`, and the one place pairs meet their metric.

A metric has one signature everywhere: ``metric(logits, pairs, clean_logits=None) -> Float[batch]``,
one number per example, on the model's logits (already read out as ``[batch, n_classes]``, or
raw ``[batch, pos, d_vocab]``, which :func:`read_logits` reads at :func:`read_positions`).
``clean_logits`` are the clean run's logits (same layout), for metrics that compare with it.

Names accepted wherever a metric is (``patch``, ``path_patch``, ``attribution_patch``,
``discover``, ``faithfulness``): ``"logit_diff"`` (the default: logit of the gold label
minus the shortcut's label on :meth:`Task.shortcut_pairs`), ``"prob_diff"``, ``"prob"`` and
``"kl"`` (KL from the clean run; ACDC's criterion, Conmy et al. 2023).

:func:`resolve_metric` is where pairs enter a metric: it refuses pairs that make an
answer-contrasting metric identically zero (``clean_answer == corrupt_answer`` everywhere).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuitkd.errors import CircuitKDError
from circuitkd.types import PromptPairs

Metric = Callable[..., Tensor]
#: what a caller may pass as ``metric=``: a name from :data:`METRICS`, a callable, or None (the default).
MetricArg = Union[str, Metric, None]


def read_positions(pairs: PromptPairs, n_pos: int, device: torch.device | str = "cpu") -> Int[Tensor, " batch"]:
    """Where each pair's output is read: ``pairs.position``, with -1 meaning each example's last
    real token when there is an attention mask (a padded causal model). The one place it is computed."""
    if pairs.position == -1 and pairs.attention_mask is not None:
        return (pairs.attention_mask.long().sum(1) - 1).to(device)
    pos = pairs.position if pairs.position >= 0 else n_pos + pairs.position
    if not 0 <= pos < n_pos:
        raise CircuitKDError(f"read position {pairs.position} is outside the {n_pos} positions of the input")
    return torch.full((len(pairs),), pos, dtype=torch.long, device=device)


def readout(logits: Tensor, read_pos: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_out"]:
    """``[batch, d_out]``: a per-position output ``[batch, pos, d_out]`` read at ``read_pos``; a
    ``[batch, d_out]`` output (a classifier's) as it is."""
    if logits.dim() == 2:
        return logits
    return logits[torch.arange(logits.shape[0], device=logits.device), read_pos.to(logits.device)]


def read_logits(logits: Tensor, pairs: PromptPairs) -> Float[Tensor, "batch n_classes"]:
    """The logits the task reads: ``[batch, n_classes]`` as is, ``[batch, pos, d_vocab]`` at
    :func:`read_positions`."""
    if logits.dim() == 2:
        return logits
    if logits.dim() != 3:
        raise CircuitKDError(f"cannot read logits of shape {tuple(logits.shape)}")
    if logits.shape[0] != len(pairs):
        raise CircuitKDError(f"logits hold {logits.shape[0]} rows for {len(pairs)} pairs")
    return readout(logits, read_positions(pairs, logits.shape[1], logits.device))


def _answers(read: Tensor, pairs: PromptPairs) -> tuple[Tensor, Tensor]:
    n_out = read.shape[-1]
    for name in ("clean_answer", "corrupt_answer"):
        ans = getattr(pairs, name)
        if int(ans.max()) >= n_out or int(ans.min()) < 0:
            raise CircuitKDError(f"pairs.{name} holds ids outside the model's {n_out} outputs")
    return pairs.clean_answer.to(read.device), pairs.corrupt_answer.to(read.device)


def logit_diff(logits: Tensor, pairs: PromptPairs, clean_logits: Optional[Tensor] = None) -> Float[Tensor, " batch"]:
    """``logit[clean_answer] - logit[corrupt_answer]`` per example (the default metric)."""
    read = read_logits(logits, pairs)
    a, b = _answers(read, pairs)
    idx = torch.arange(read.shape[0], device=read.device)
    return read[idx, a] - read[idx, b]


def prob_diff(logits: Tensor, pairs: PromptPairs, clean_logits: Optional[Tensor] = None) -> Float[Tensor, " batch"]:
    """``p(clean_answer) - p(corrupt_answer)`` per example."""
    read = read_logits(logits, pairs)
    a, b = _answers(read, pairs)
    p = read.float().softmax(-1)
    idx = torch.arange(read.shape[0], device=read.device)
    return p[idx, a] - p[idx, b]


# A metric that is the difference of the two answers' scores: 0 on every run when the answers agree.
logit_diff.contrasts_answers = True  # type: ignore[attr-defined]
prob_diff.contrasts_answers = True  # type: ignore[attr-defined]


class Prob:
    """Probability of the clean (``answer="clean"``) or corrupt answer per example."""

    def __init__(self, answer: str = "clean"):
        if answer not in ("clean", "corrupt"):
            raise CircuitKDError(f"Prob answer must be 'clean' or 'corrupt', got {answer!r}")
        self.answer = answer

    def __call__(self, logits: Tensor, pairs: PromptPairs, clean_logits: Optional[Tensor] = None) -> Tensor:
        read = read_logits(logits, pairs)
        idx = getattr(pairs, f"{self.answer}_answer").to(read.device)[:, None]
        return read.float().softmax(-1).gather(1, idx)[:, 0]


class KLToClean:
    """``KL(p_clean ‖ p_run)`` per example: 0 on the clean run (lower is more clean-like).

    ``clean_logits`` may hold fewer rows than ``logits`` when the run stacks copies of the
    batch (copy-major): they are repeated to match.
    """

    def __call__(self, logits: Tensor, pairs: PromptPairs, clean_logits: Optional[Tensor] = None) -> Tensor:
        if clean_logits is None:
            raise CircuitKDError("metric 'kl' compares with the clean run's logits, which this analysis does not "
                                 "pass: use a metric that needs no clean run (e.g. 'logit_diff')")
        if clean_logits.shape[0] != logits.shape[0]:
            reps = logits.shape[0] // clean_logits.shape[0]
            clean_logits = clean_logits.repeat(reps, *[1] * (clean_logits.dim() - 1))
        log_p = read_logits(clean_logits, pairs).float().log_softmax(-1)
        log_q = read_logits(logits, pairs).float().log_softmax(-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)


METRICS: dict[str, Callable[[], Metric]] = {
    "logit_diff": lambda: logit_diff, "prob_diff": lambda: prob_diff, "prob": Prob, "kl": KLToClean,
}


def resolve_metric(metric: MetricArg, pairs: PromptPairs) -> Metric:
    """The metric a name or callable stands for (None: ``logit_diff``), checked against ``pairs``.

    Raises :class:`CircuitKDError` when the metric contrasts the two answers but
    ``pairs.clean_answer`` equals ``pairs.corrupt_answer`` on every pair (the metric would be 0
    on every run, clean, corrupt and patched alike).
    """
    if metric is None:
        metric = logit_diff
    elif isinstance(metric, str):
        if metric not in METRICS:
            raise CircuitKDError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)} or a callable")
        metric = METRICS[metric]()
    elif not callable(metric):
        raise CircuitKDError(f"metric must be a callable (logits, pairs, clean_logits=None) -> Float[batch] or a name, "
                             f"got {type(metric).__name__}")
    if getattr(metric, "contrasts_answers", False) and torch.equal(pairs.clean_answer, pairs.corrupt_answer):
        name = metric_name(metric)
        raise CircuitKDError(
            f"pairs.clean_answer equals pairs.corrupt_answer on all {len(pairs)} pairs, so metric {name!r} "
            "is 0 on every run: use task.shortcut_pairs(n) (clean_answer = gold label, corrupt_answer = "
            "the shortcut's label), or pass a metric that does not need differing answers (e.g. metric='kl')"
        )
    return metric


def evaluate_metric(metric: Metric, logits: Tensor, pairs: PromptPairs,
                    clean_logits: Optional[Tensor] = None) -> Float[Tensor, " batch"]:
    """Run ``metric`` (a resolved one) and check it returns one number per example; float64."""
    name = metric_name(metric)
    n_out = logits.shape[-1]
    for field in ("clean_answer", "corrupt_answer"):
        ans = getattr(pairs, field)
        if ans.numel() and (int(ans.max()) >= n_out or int(ans.min()) < 0):
            raise CircuitKDError(f"pairs.{field} holds id {int(ans.max())} but the model has {n_out} outputs "
                                 f"(classes or vocabulary): ids must be in [0, {n_out})")
    try:
        out = metric(logits, pairs, clean_logits=clean_logits)
    except TypeError as exc:
        if "clean_logits" not in str(exc):
            raise
        raise CircuitKDError(f"metric {name!r} must take the one metric signature "
                             "metric(logits, pairs, clean_logits=None)") from exc
    if not isinstance(out, Tensor) or out.shape != (logits.shape[0],):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise CircuitKDError(f"metric must return one number per example: expected shape ({logits.shape[0]},), "
                             f"got {shape} (metric {name!r})")
    if torch.is_grad_enabled() and logits.requires_grad and not out.requires_grad:
        raise CircuitKDError(f"metric {name!r} does not depend on the logits it is given (its value has no "
                             "gradient with respect to them): compute it from the logits argument")
    if out.is_floating_point() and not bool(torch.isfinite(out.detach()).all()):
        bad = int((~torch.isfinite(out.detach())).sum())
        raise CircuitKDError(f"metric {name!r} returned a non-finite value (NaN or inf) on {bad} of "
                             f"{out.shape[0]} examples")
    return out.double()


def metric_name(metric: Metric) -> str:
    """A metric's name for messages: its function name, or its class name."""
    return getattr(metric, "__name__", None) or type(metric).__name__
