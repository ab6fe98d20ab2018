"""A tiny text task with one planted shortcut, for fast debiasing and distillation tests.

The label is whether token "a" outnumbers token "b" (a structural rule); a cue token
agrees with the label on ``strength`` of the training (and in-distribution test) examples
and always disagrees on the OOD split, so a model that leans on the cue fails OOD.
"""
from __future__ import annotations

import torch

from circuitkd.data.task import Split, Task

PAD, CLS, A, B = 0, 1, 2, 3
FILLERS = (4, 5, 6, 7, 8, 9)
CUE = (10, 11)  # CUE[y] is the cue token that predicts label y
SEQ = 12


class ToyTokenizer:
    vocab_size = 12
    pad_token_id = PAD

    def __len__(self) -> int:
        return self.vocab_size


def _examples(n: int, p_aligned: float, g: torch.Generator) -> Split:
    labels = torch.randint(0, 2, (n,), generator=g)
    aligned = torch.rand(n, generator=g) < p_aligned
    cue_label = torch.where(aligned, labels, 1 - labels)
    inputs = torch.full((n, SEQ), PAD, dtype=torch.long)
    mask = torch.zeros(n, SEQ, dtype=torch.long)
    for i in range(n):
        # Counts differ by one or two, so the rule needs real counting.
        small = int(torch.randint(1, 4, (1,), generator=g))
        big = small + int(torch.randint(1, 3, (1,), generator=g))
        n_a, n_b = (big, small) if labels[i] == 1 else (small, big)
        length = int(torch.randint(n_a + n_b + 1, SEQ - 1, (1,), generator=g))
        body = [A] * n_a + [B] * n_b
        body += [FILLERS[int(j)] for j in torch.randint(0, len(FILLERS), (length - len(body) - 1,), generator=g)]
        body.append(CUE[int(cue_label[i])])
        perm = torch.randperm(len(body), generator=g).tolist()
        seq = [CLS] + [body[j] for j in perm]
        inputs[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    groups = labels * 2 + cue_label
    return Split(inputs=inputs, labels=labels, bias_labels={"cue": cue_label}, groups=groups, attention_mask=mask)


def toy_task(seed: int = 0, n_train: int = 2000, strength: float = 0.98, n_test: int = 400) -> Task:
    g = torch.Generator().manual_seed(seed)
    splits = {
        "train": _examples(n_train, strength, g),
        "id_test": _examples(n_test, strength, g),
        "ood_test": _examples(n_test, 0.0, g),
    }

    def augment_fn(n: int = 500, seed: int = 0) -> Split:
        # Bias-conflicting examples: the cue disagrees with the label.
        return _examples(n, 0.0, torch.Generator().manual_seed(10_000 + seed))

    return Task(name="toy", modality="text", n_classes=2, label_names=("b>=a", "a>b"), bias_types=("cue",),
                group_names=tuple(f"{y}|cue{c}" for y in (0, 1) for c in (0, 1)), splits=splits,
                tokenizer=ToyTokenizer(), info={"seed": seed, "strength": strength}, augment_fn=augment_fn)
