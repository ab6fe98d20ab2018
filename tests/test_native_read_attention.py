"""The last layer of a resumed native forward attends from the read position only without forming keys
and values at every position (``NativeExecutor.attend_read``, issue 15): equal to full attention there,
biases included, and the fast head x position patch built on it equal to the hooked reference."""
from __future__ import annotations

import pytest
import torch

from circuitkd import ModelSpec, PromptPairs, build_model
from circuitkd.native import NativeExecutor
from circuitkd.patching import patch


def _model(causal: bool):
    spec = ModelSpec.preset("student").replace(d_vocab=30, n_ctx=8, n_classes=3, d_model=32, n_layers=3,
                                               causal=causal, seed=1)
    model = build_model(spec, device="cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero biases: the value bias enters the read attention on its own
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.3 * torch.randn(param.shape, generator=g))
    return model


@pytest.mark.parametrize("causal", [False, True])
def test_attend_read_equals_full_attention_at_the_read_query(causal):
    model = _model(causal)
    ex = NativeExecutor(model)
    g = torch.Generator().manual_seed(0)
    N, B, P, layer = 2, 3, 8, 2
    h = torch.randn(N, B, P, ex.d, generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2] = 0  # every source blocked: a zero pattern, so a zero z (TransformerLens's convention)
    blocked = ex.blocked(mask, P, h.device)  # [B 1 P P]
    read = torch.tensor([0, 4, 2])
    p = ex.layers[layer]
    q, k, v = ex.heads(p["q"], h), ex.heads(p["k"], h), ex.heads(p["v"], h)
    ar = torch.arange(B)
    z_full, _ = ex.attend(q, k, v, blocked.expand(B, 1, P, P))
    want = z_full[:, ar, read]  # [N B H dh]
    got = ex.attend_read(layer, h, q[:, ar, read], blocked.expand(B, 1, P, P)[ar, :, read])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want[:, 0].abs().max() > 0.1 and float(want[:, 2].abs().max()) == 0.0


def test_fast_head_pos_patch_with_biases_equals_reference():
    model = _model(causal=False)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, 30, (5, 8), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2:5] = torch.randint(1, 30, (5, 3), generator=g)
    mask = torch.ones_like(clean)
    mask[0, 6:] = 0
    pairs = PromptPairs(clean=clean, corrupt=corrupt, clean_answer=torch.arange(5) % 3,
                        corrupt_answer=(torch.arange(5) + 1) % 3, position=0, attention_mask=mask)
    fast = patch(model, pairs, "head_pos", method="fast", normalise=False, batch_size=5)
    ref = patch(model, pairs, "head_pos", method="reference", normalise=False)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    assert (ref - ref.mean()).abs().max() > 1e-3
