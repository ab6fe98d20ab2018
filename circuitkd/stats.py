"""Statistics of the study: bootstrap intervals over seeds and examples, and verdicts computed from them.

An accuracy difference between two models of this study has two sources of noise: the
training seed and the finite test set. :func:`bootstrap_interval` resamples both at once,
crossed: seeds with replacement, and test examples with replacement (the same examples for
every model and seed, since all are scored on one test set), through
``scipy.stats.bootstrap`` with two independently resampled samples (the seed indices and the
example indices) and the percentile method.

A verdict is read off an interval by :func:`verdict` with a stated margin, never by prose:
"holds" when the interval lies above the margin, "does not hold" when it lies below it (or
inside a band of equivalence, for claims that an effect is small), "inconclusive" otherwise,
and "inconclusive (1 seed)" when fewer than two seeds were run.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import numpy as np
from scipy import stats as sps

from circuitkd.errors import CircuitKDError

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95% interval (``lo``, ``hi``), from ``n_seeds`` seeds."""

    estimate: float
    lo: float
    hi: float
    n_seeds: int

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "lo": self.lo, "hi": self.hi, "n_seeds": self.n_seeds}

    def fmt(self, scale: float = 100.0, digits: int = 1) -> str:
        if math.isnan(self.estimate):
            return "–"
        if math.isnan(self.lo):
            return f"{scale * self.estimate:.{digits}f}"
        return f"{scale * self.estimate:.{digits}f} [{scale * self.lo:.{digits}f}, {scale * self.hi:.{digits}f}]"


NAN_INTERVAL = Interval(float("nan"), float("nan"), float("nan"), 0)


def bootstrap_interval(correct: Mapping[str, np.ndarray], statistic: Callable[[dict[str, np.ndarray]], np.ndarray],
                       *, masks: Optional[Mapping[str, np.ndarray]] = None, n_resamples: int = 2000,
                       confidence: float = 0.95, seed: int = 0) -> Interval:
    """95% percentile interval of ``statistic`` under a crossed seed x example bootstrap.

    Args:
        correct: model name -> ``Bool[seed, example]`` per-example correctness of that model
            for each seed (every model scored on the same examples, seeds in the same order).
        statistic: ``acc -> Float[resample]`` where ``acc[name]`` is ``Float[resample, seed]``,
            each model's accuracy per (resampled) seed on the resampled examples; it must
            reduce over seeds itself (usually a mean), so ratios of means stay ratios of means.
        masks: model name -> ``Bool[example]``: score that model only on these examples
            (e.g. the examples whose overlap shortcut conflicts); default all.
    """
    names = list(correct)
    if not names:
        raise CircuitKDError("bootstrap_interval needs at least one model's per-example correctness")
    mats = {k: np.asarray(v, dtype=np.float64) for k, v in correct.items()}
    shapes = {k: m.shape for k, m in mats.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise CircuitKDError(f"per-example correctness must share one [seed, example] shape, got {shapes}")
    n_seeds, n_ex = next(iter(shapes.values()))
    weights = {k: (np.ones(n_ex) if masks is None or k not in masks else np.asarray(masks[k], dtype=np.float64))
               for k in names}

    def accuracies(seed_idx: np.ndarray, ex_idx: np.ndarray) -> dict[str, np.ndarray]:
        """seed_idx ``[resample, seed]``, ex_idx ``[resample, example]`` -> name -> ``[resample, seed]``."""
        counts = _counts(ex_idx, n_ex)                                  # [resample, example]
        out = {}
        for k in names:
            cw = counts * weights[k][None]
            per_seed = (mats[k] @ cw.T).T / np.maximum(cw.sum(-1, keepdims=True), 1e-12)  # [resample, seed]
            out[k] = np.take_along_axis(per_seed, seed_idx, axis=1)
        return out

    point = float(np.asarray(statistic(accuracies(np.arange(n_seeds)[None], np.arange(n_ex)[None])))[0])
    if n_seeds < 2 or not math.isfinite(point):
        return Interval(point, float("nan"), float("nan"), n_seeds)

    def stat(seed_idx, ex_idx, axis=-1):
        seed_idx = np.asarray(seed_idx, dtype=np.int64).reshape(-1, n_seeds)
        ex_idx = np.asarray(ex_idx, dtype=np.int64).reshape(-1, n_ex)
        return np.asarray(statistic(accuracies(seed_idx, ex_idx)), dtype=np.float64)

    res = sps.bootstrap((np.arange(n_seeds), np.arange(n_ex)), stat, paired=False, vectorized=True,
                        n_resamples=n_resamples, batch=250, confidence_level=confidence, method="percentile",
                        random_state=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return Interval(point, lo, hi, n_seeds)


def _counts(ex_idx: np.ndarray, n_ex: int) -> np.ndarray:
    """``[resample, n_ex]``: how often each example was drawn in each resample."""
    counts = np.zeros((ex_idx.shape[0], n_ex))
    np.add.at(counts, (np.arange(ex_idx.shape[0])[:, None], ex_idx), 1.0)
    return counts


def seed_interval(values: list[float], confidence: float = 0.95) -> Interval:
    """Mean over seeds with a Student-t interval (for per-seed quantities with no per-example data)."""
    vals = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(vals) == 0:
        return NAN_INTERVAL
    mean = float(vals.mean())
    if len(vals) < 2:
        return Interval(mean, float("nan"), float("nan"), len(vals))
    half = float(sps.t.ppf(0.5 + confidence / 2, len(vals) - 1) * vals.std(ddof=1) / math.sqrt(len(vals)))
    return Interval(mean, mean - half, mean + half, len(vals))


def verdict(iv: Interval, *, above: float = 0.0, equivalence: Optional[float] = None) -> str:
    """Read a verdict off an interval.

    * default (an effect claimed to exist): "holds" if ``lo > above``; "does not hold" if
      ``hi < above``; else "inconclusive";
    * ``equivalence=m`` (an effect claimed to be small): "holds" if the interval lies inside
      ``(-m, m)``; "does not hold" if it lies wholly outside it; else "inconclusive".
    """
    if iv.n_seeds < 2:
        return f"{INCONCLUSIVE} ({iv.n_seeds} seed{'s' if iv.n_seeds != 1 else ''})"
    if any(math.isnan(x) for x in (iv.lo, iv.hi)):
        return INCONCLUSIVE
    if equivalence is not None:
        if -equivalence < iv.lo and iv.hi < equivalence:
            return HOLDS
        if iv.lo >= equivalence or iv.hi <= -equivalence:
            return FAILS
        return INCONCLUSIVE
    if iv.lo > above:
        return HOLDS
    if iv.hi < above:
        return FAILS
    return INCONCLUSIVE


def combine(verdicts: list[str]) -> str:
    """One verdict from several (e.g. one per debiasing method): unanimous, else inconclusive."""
    if not verdicts:
        return INCONCLUSIVE
    if any(v.startswith(INCONCLUSIVE + " (") for v in verdicts):
        return next(v for v in verdicts if v.startswith(INCONCLUSIVE + " ("))
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    if all(v == FAILS for v in verdicts):
        return FAILS
    return INCONCLUSIVE


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std of ``values``, ignoring None/NaN; (nan, nan) when none are left."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std
