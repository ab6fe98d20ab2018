"""The native training forward equals the hooked TransformerLens bridge: logits, hidden state, gradients.

The training forward runs the last layer at the read row only and fuses q/k/v; the bridge runs
every hook point at every position. They must agree on encoders (read at CLS) and causal models
(read at each example's last real token), with padding, at one and several layers.
"""
import pytest
import torch

from circuitkd.config import ModelSpec
from circuitkd.models import build_model
from circuitkd.models.build import forward_logits, read_positions, select_class_logits
from circuitkd.native import class_logits_native, masked_softmax, patterns_native


def _model(n_layers: int, causal: bool, attn_only: bool = False):
    spec = ModelSpec.preset("tiny", n_layers=n_layers, d_vocab=40, n_ctx=12, n_classes=3, causal=causal,
                            attn_only=attn_only, seed=3)
    return build_model(spec, device="cpu")


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(4, 40, (5, 11), generator=g)
    mask = torch.ones_like(x)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    return x, mask


def _grads(model, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    (logits * torch.arange(1.0, 4.0)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("attn_only", [False, True])
def test_training_forward_equals_the_hooked_bridge(n_layers, causal, attn_only):
    model = _model(n_layers, causal, attn_only)
    x, mask = _inputs()
    read = read_positions(model, x, mask)
    if causal:
        assert read.tolist() == [10, 6, 10, 3, 10]  # each example's last real token, not one position
    want = select_class_logits(model, forward_logits(model, x, mask), mask)
    want_grads = _grads(model, want)
    got, hidden = class_logits_native(model, x, mask, read, return_hidden=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got_grads = _grads(model, got)
    assert set(got_grads) == set(want_grads)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    # the hidden state is the classifier's input: the unembedding of it gives the logits
    unembed = model.unembed.original_component
    torch.testing.assert_close(torch.nn.functional.linear(hidden, unembed.weight, unembed.bias), got)
    # the patterns forward (every row of the last layer) gives the same logits
    logits_p, patterns = patterns_native(model, x, mask, read)
    torch.testing.assert_close(logits_p, want, atol=1e-5, rtol=1e-5)
    assert patterns.shape == (5, n_layers, model.cfg.n_heads, 11, 11)


@pytest.mark.parametrize("n_src", [1, 5, 15, 16, 17])
def test_masked_softmax_equals_a_plain_softmax_at_every_row_length(n_src):
    g = torch.Generator().manual_seed(n_src)
    scores = torch.randn(3, 2, 4, n_src, generator=g, requires_grad=True)
    blocked = torch.zeros(3, 1, 1, n_src, dtype=torch.bool)
    blocked[0, ..., -1] = True
    blocked[2] = True  # every key blocked: an all-zero pattern, not NaN
    got = masked_softmax(scores, blocked)
    want = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1).nan_to_num(0.0)
    if n_src == 1:
        want = want.masked_fill(blocked, 0.0)
    torch.testing.assert_close(got, want)
    assert got.shape == scores.shape and bool((got[2] == 0).all())
    w = torch.randn(got.shape, generator=g)
    (grad,) = torch.autograd.grad((got * w).sum(), scores)
    ref = scores.detach().clone().requires_grad_(True)
    plain = torch.softmax(ref[:2].masked_fill(blocked[:2], float("-inf")), dim=-1)
    (want_grad,) = torch.autograd.grad((plain * w[:2]).sum(), ref)
    torch.testing.assert_close(grad[:2], want_grad[:2])
    assert bool((grad[2] == 0).all())
