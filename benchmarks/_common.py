"""Measurements the benchmarks share: executed FLOPs, the matmul peak of the model's shapes,
and peak resident memory of one call. Nothing here is a constant standing in for a measurement."""
from __future__ import annotations

import time
from typing import Callable, Iterable

import torch


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls/convolutions/attention ``fn`` executes (``torch.utils.flop_counter``),
    forward and backward: the arithmetic the method actually ran, counted on an untimed call."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(shapes: Iterable[tuple[int, int, int]], *, seconds: float = 0.3) -> tuple[float, dict]:
    """Best GFLOP/s of ``torch.matmul`` over ``(m, k, n)`` shapes, measured now, in this process
    (same thread count as the benchmark). Returns the peak and the rate of every shape."""
    rates = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.matmul(a, b)  # warm-up
        best, spent = 0.0, 0.0
        while spent < seconds:
            start = time.perf_counter()
            torch.matmul(a, b)
            dt = time.perf_counter() - start
            spent += dt
            best = max(best, 2 * m * k * n / dt / 1e9)
        rates[(m, k, n)] = best
    return max(rates.values()), rates


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_growth_mb(fn: Callable[[], object]) -> float:
    """Peak resident memory ``fn`` adds above the process's resident set when it starts (MB).

    The kernel's high-water mark is reset first (``/proc/self/clear_refs``), so earlier peaks
    (building the model) do not hide the call's own. Run in a fresh process for a clean number.
    """
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = rss_mb("VmRSS")
    fn()
    return rss_mb("VmHWM") - before


def slope_per_1k(ns: list[int], values: list[float]) -> float:
    """Least-squares slope of ``values`` against ``ns``, per 1,000 (e.g. MB per 1,000 prompts)."""
    n = torch.tensor(ns, dtype=torch.float64)
    v = torch.tensor(values, dtype=torch.float64)
    nc = n - n.mean()
    return float((nc * (v - v.mean())).sum() / (nc * nc).sum() * 1000)
