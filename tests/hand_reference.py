"""Inputs and metrics the hand-written references share (no circuitkd code: the references must not
share anything with the paths they check)."""
import torch

from circuitkd.types import PromptPairs


def random_pairs(n: int, n_pos: int, vocab: int, *, padding: dict[int, int], n_out: int = 3,
                 position: int = 0) -> PromptPairs:
    """``n`` random clean/corrupt pairs that differ at positions 2-4; example i has ``padding[i]`` pad tokens."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, vocab, (n, n_pos), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2:5] = torch.randint(1, vocab, (n, 3), generator=g)
    mask = torch.ones(n, n_pos, dtype=torch.long)
    for i, k in padding.items():
        mask[i, n_pos - k:] = 0
    answer = torch.randint(0, n_out, (n,), generator=g)
    return PromptPairs(clean=clean, corrupt=corrupt, clean_answer=answer, corrupt_answer=(answer + 1) % n_out,
                       attention_mask=mask, position=position)


def logit_diff_at_cls(logits: torch.Tensor, pairs: PromptPairs) -> torch.Tensor:
    """logit(clean answer) − logit(corrupt answer) at position 0, per example."""
    read = logits[:, 0]
    idx = torch.arange(read.shape[0])
    return read[idx, pairs.clean_answer] - read[idx, pairs.corrupt_answer]
