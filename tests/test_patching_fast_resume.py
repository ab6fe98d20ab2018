"""The patching fast path's resumed forward (issue 15) against the hooked reference, one bridge
forward per patched cell: :func:`circuitkd.native.sparse_layer` (one changed position: only its
q/k/v are new, :func:`~circuitkd.native.attend_changed` updates every query's attention for the one
changed key and value), :func:`~circuitkd.native.dense_layer` and :func:`~circuitkd.native.mlp_into`
(scratch buffers reused across chunks) and :func:`~circuitkd.native.after_mid` (a last-layer patch
reaches the read-out only at the read position).

The models' biases and LayerNorm parameters are randomised: freshly built ones are 0 and 1, and a
dropped bias or shift would go unseen. Three layers put a patch's changed-position layer, a dense
layer and the read-out-only last layer on every path; masks pad two examples; positions include
the read-out (0 for encoders), a corrupted one and a padded one; chunks of 5 copies leave a shorter
last chunk, so the scratch buffers are reused at a smaller shape.
"""
import pytest
import torch

from circuitkd import ModelSpec, PromptPairs, build_model
from circuitkd.patching import patch

N_POS = 8


def _model(causal: bool, act_fn: str = "gelu", attn_only: bool = False, n_layers: int = 3):
    spec = ModelSpec.preset("student").replace(d_vocab=30, n_ctx=N_POS, n_classes=3, d_model=64, n_layers=n_layers,
                                               causal=causal, act_fn=act_fn, attn_only=attn_only)
    model = build_model(spec, device="cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # biases, LayerNorm weights and shifts
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


def _pairs(causal: bool) -> PromptPairs:
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, 30, (5, N_POS), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2:5] = torch.randint(1, 30, (5, 3), generator=g)
    mask = torch.ones(5, N_POS, dtype=torch.long)
    mask[0, N_POS - 2:] = 0
    mask[1, N_POS - 1:] = 0
    answer = torch.randint(0, 3, (5,), generator=g)
    return PromptPairs(clean=clean, corrupt=corrupt, clean_answer=answer, corrupt_answer=(answer + 1) % 3,
                       attention_mask=mask, position=-1 if causal else 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("site", ["head_pos", "head", "resid_pre", "resid_mid", "mlp_out_layer", "k_pos"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_fast_equals_reference_with_random_biases(causal, site, direction):
    model, pairs = _model(causal), _pairs(causal)
    kw = dict(direction=direction, normalise=False, positions=[0, 3, 6, 7])
    ref = patch(model, pairs, site, method="reference", **kw)
    fast = patch(model, pairs, site, method="fast", copies_per_forward=5, batch_size=3, **kw)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("act_fn,attn_only", [("relu", False), ("gelu_new", False), ("silu", False), ("gelu", True)])
def test_fast_equals_reference_other_activations(act_fn, attn_only):
    """The in-place activations of :func:`~circuitkd.native.mlp_into`, and attention-only models."""
    model, pairs = _model(False, act_fn, attn_only), _pairs(False)
    kw = dict(normalise=False, positions=[0, 3, 7])
    torch.testing.assert_close(patch(model, pairs, "head_pos", method="fast", copies_per_forward=5, **kw),
                               patch(model, pairs, "head_pos", method="reference", **kw), atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_fast_equals_reference_in_several_row_blocks(monkeypatch, causal):
    """Dense layers and MLPs split a chunk of copies into row blocks (:func:`~circuitkd.native.copy_blocks`):
    with 50 rows a block, 3 examples x 8 positions make blocks of 2, 2 and 1 of a chunk's 5 copies. Four
    layers: a layer-0 patch passes a changed-position layer, a dense layer and the read-out layer."""
    from circuitkd import native

    monkeypatch.setattr(native, "BLOCK_ROWS", 50)
    model, pairs = _model(causal, n_layers=4), _pairs(causal)
    site = "head_pos"
    kw = dict(normalise=False, positions=[0, 3, 7])
    torch.testing.assert_close(patch(model, pairs, site, method="fast", copies_per_forward=5, batch_size=3, **kw),
                               patch(model, pairs, site, method="reference", **kw), atol=1e-5, rtol=0)
