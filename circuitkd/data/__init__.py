"""Data with controllable shortcut features: synthetic NLI, Colored MNIST, real benchmarks."""
from circuitkd.data.task import SPLITS, Split, Task
from circuitkd.data.tokenizer import WordTokenizer
from circuitkd.data.synthetic_nli import synthetic_nli
from circuitkd.data.colored_mnist import colored_mnist
from circuitkd.data.loaders import load_celeba, load_hans, load_mnli, load_snli, load_waterbirds

__all__ = [
    "SPLITS", "Split", "Task", "WordTokenizer", "synthetic_nli", "colored_mnist",
    "load_mnli", "load_hans", "load_snli", "load_waterbirds", "load_celeba",
]
