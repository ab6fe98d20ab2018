"""Data with controllable shortcut features: synthetic NLI, Colored MNIST and shortcut MNIST, real benchmarks.

The real-benchmark loaders load on first use, so ``import circuitkd`` does not pull in
``datasets``. The generators are imported eagerly: their modules share the functions'
names, and a lazily bound name would be shadowed by the submodule once anything imported it.
"""
from __future__ import annotations

import importlib

from circuitkd.data.colored_mnist import colored_mnist
from circuitkd.data.shortcut_mnist import shortcut_mnist
from circuitkd.data.synthetic_nli import synthetic_nli
from circuitkd.data.task import SPLITS, Split, Task
from circuitkd.data.tokenizer import WordTokenizer

_LAZY = {
    "load_mnli": "circuitkd.data.loaders",
    "load_hans": "circuitkd.data.loaders",
    "load_snli": "circuitkd.data.loaders",
    "load_waterbirds": "circuitkd.data.loaders",
    "load_celeba": "circuitkd.data.loaders",
}

__all__ = ["SPLITS", "Split", "Task", "WordTokenizer", "synthetic_nli", "colored_mnist", "shortcut_mnist", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'circuitkd.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
