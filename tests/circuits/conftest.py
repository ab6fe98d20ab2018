"""Tiny models and pairs for the circuit tests (built from config, seeded)."""
from __future__ import annotations

import pytest
import torch

from circuitkd.config import ModelSpec
from circuitkd.models.build import build_model
from circuitkd.types import PromptPairs


def text_pairs(n: int = 6, pos: int = 8, vocab: int = 20, seed: int = 0, position: int = 0) -> PromptPairs:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, vocab, (n, pos), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1:4] = torch.randint(1, vocab, (n, 3), generator=g)
    ans = torch.arange(n) % 2
    return PromptPairs(clean=clean, corrupt=corrupt, clean_answer=ans, corrupt_answer=1 - ans, position=position)


def image_pairs(n: int = 4, seed: int = 0) -> PromptPairs:
    g = torch.Generator().manual_seed(seed)
    ans = torch.arange(n) % 2
    return PromptPairs(clean=torch.randn(n, 3, 8, 8, generator=g), corrupt=torch.randn(n, 3, 8, 8, generator=g),
                       clean_answer=ans, corrupt_answer=1 - ans)


SPECS = {
    "native": ModelSpec(backbone="native", n_layers=2, d_model=32, n_heads=2, d_vocab=20, n_ctx=8, n_classes=2),
    "causal": ModelSpec(backbone="native", n_layers=2, d_model=32, n_heads=2, d_vocab=20, n_ctx=8, causal=True),
    "bert": ModelSpec(backbone="bert", n_layers=2, d_model=32, n_heads=2, d_vocab=20, n_ctx=8, n_classes=2),
    "vit": ModelSpec(backbone="vit", n_layers=2, d_model=32, n_heads=2, n_classes=2, image_size=8, patch_size=4),
}


def _scale_up(model, factor: float = 8.0):
    # HF's 0.02-std init makes every edge effect tiny; larger weights make the tests sensitive.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name.lower() and "embeddings" not in name:
                p.mul_(factor)


@pytest.fixture(params=list(SPECS))
def model_and_pairs(request):
    kind = request.param
    torch.manual_seed(0)
    model = build_model(SPECS[kind], device="cpu")
    if kind in ("bert", "vit"):
        _scale_up(model, 4.0)
    if kind == "vit":
        return kind, model, image_pairs()
    if kind == "causal":
        p = text_pairs(position=-1)
        return kind, model, PromptPairs(clean=p.clean, corrupt=p.corrupt, clean_answer=p.clean[:, 0],
                                        corrupt_answer=p.corrupt[:, 1], position=-1)
    return kind, model, text_pairs()


def build(kind: str):
    torch.manual_seed(0)
    model = build_model(SPECS[kind], device="cpu")
    if kind in ("bert", "vit"):
        _scale_up(model, 4.0)
    return model
