"""Data with controllable shortcut features: synthetic NLI, Colored MNIST, real benchmarks.

Submodules load on first use, so ``import circuitkd`` stays light (the real-benchmark
loaders pull in ``datasets``).
"""
from __future__ import annotations

import importlib

from circuitkd.data.task import SPLITS, Split, Task

_LAZY = {
    "WordTokenizer": "circuitkd.data.tokenizer",
    "synthetic_nli": "circuitkd.data.synthetic_nli",
    "colored_mnist": "circuitkd.data.colored_mnist",
    "load_mnli": "circuitkd.data.loaders",
    "load_hans": "circuitkd.data.loaders",
    "load_snli": "circuitkd.data.loaders",
    "load_waterbirds": "circuitkd.data.loaders",
    "load_celeba": "circuitkd.data.loaders",
}

__all__ = ["SPLITS", "Split", "Task", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'circuitkd.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
