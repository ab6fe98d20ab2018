"""Shared test fixtures: deterministic seeding, one torch thread, tiny tasks built in memory."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def toy_text_task(n_train: int = 256, n_test: int = 64, seq: int = 8, vocab: int = 20, seed: int = 0):
    """A 2-class task: label = whether token 5 occurs; a shortcut token 7 at position 1 agrees in train."""
    from circuitkd.data.task import Split, Task

    g = torch.Generator().manual_seed(seed)

    def make(n: int, aligned_frac: float) -> Split:
        x = torch.randint(8, vocab, (n, seq), generator=g)
        x[:, 0] = 1  # CLS
        mask = torch.ones(n, seq, dtype=torch.long)
        length = torch.randint(seq - 2, seq + 1, (n,), generator=g)
        mask[torch.arange(seq)[None] >= length[:, None]] = 0
        labels = torch.randint(0, 2, (n,), generator=g)
        # the label token sits inside the real (unpadded) tokens
        pos = 2 + (torch.rand(n, generator=g) * (length - 2)).long()
        x[labels == 1, pos[labels == 1]] = 5
        aligned = torch.rand(n, generator=g) < aligned_frac
        shortcut = torch.where(aligned, labels, 1 - labels)
        x[:, 1] = torch.where(shortcut == 1, 7, 6)
        x[mask == 0] = 0
        return Split(inputs=x, labels=labels, bias_labels={"token": shortcut},
                     groups=labels * 2 + (shortcut == labels).long(), attention_mask=mask)

    class Tok:
        pad_token_id = 0
        vocab_size = vocab

    return Task(
        name="toy", modality="text", n_classes=2, label_names=("no", "yes"), bias_types=("token",),
        group_names=("0|conflict", "0|aligned", "1|conflict", "1|aligned"),
        splits={"train": make(n_train, 0.9), "id_test": make(n_test, 0.9), "ood_test": make(n_test, 0.0)},
        tokenizer=Tok(),
    )


@pytest.fixture
def toy_task():
    return toy_text_task()


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """A finished ``circuitkd run --quick`` folder with its analysis, shared by the end-to-end tests."""
    from circuitkd.run.plan import load_config
    from circuitkd.run.runner import run_experiment
    from circuitkd.run.study import analyse_run

    run_dir = tmp_path_factory.mktemp("runs") / "quick"
    run_experiment(load_config(quick=True), run_dir, log=lambda *_: None)
    analyse_run(run_dir, n_pairs=32, n_attention=64, log=lambda *_: None)
    return run_dir
