"""Bugs the fuzz tests (tests/test_fuzz.py) found, each pinned by a named regression test."""
import pytest
import torch

import circuitkd as ckd
from circuitkd import CircuitKDError, ModelSpec, PromptPairs, build_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    spec = ModelSpec(backbone="native", n_layers=1, d_model=16, n_heads=2, d_vocab=20, n_ctx=8, n_classes=3)
    return build_model(spec, device="cpu")


def test_uint8_token_ids_are_ids_not_a_boolean_mask(model):
    """Found by test_fuzz_patch: uint8 ids indexed the embedding as a mask (a raw IndexError)."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, 20, (2, 6), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = (corrupt[:, 2] + 1) % 20
    fields = dict(clean_answer=torch.tensor([0, 1]), corrupt_answer=torch.tensor([1, 2]))
    as_long = ckd.patch(model, PromptPairs(clean=clean, corrupt=corrupt, **fields), site="resid", metric="kl")
    for dtype in (torch.uint8, torch.int32, torch.int16):
        pairs = PromptPairs(clean=clean.to(dtype), corrupt=corrupt.to(dtype), **fields)
        assert pairs.clean.dtype == pairs.corrupt.dtype == torch.long
        assert torch.equal(ckd.patch(model, pairs, site="resid", metric="kl"), as_long)


def test_token_ids_paired_with_pixels_are_refused():
    with pytest.raises(CircuitKDError, match="clean and corrupt must both be token ids or both pixels"):
        PromptPairs(clean=torch.ones(2, 4, dtype=torch.long), corrupt=torch.ones(2, 4),
                    clean_answer=torch.tensor([0, 1]), corrupt_answer=torch.tensor([1, 0]))


def test_an_unknown_device_string_is_a_circuitkd_error(tmp_path):
    """Found by test_fuzz_cli_arguments: ``--device 0`` reached torch.device and raised a raw RuntimeError."""
    import circuitkd as ckd

    task = ckd.data.synthetic_nli(seed=0, n_train=60, n_id=30, n_ood=30)
    with pytest.raises(ckd.CircuitKDError, match="unknown device '0'"):
        ckd.build_model(ckd.ModelSpec.preset("tiny"), task, device="0")
