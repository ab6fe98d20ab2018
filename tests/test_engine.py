"""engine.py: batched hooked forwards with padding, streaming reducers and scoped hooks."""
from __future__ import annotations

import pytest
import torch

from circuitkd import CircuitKDError, ModelSpec, build_model
from circuitkd.data.task import Split
from circuitkd.engine import AttentionMass, Mean, TokenClassMean, pad_right, run
from circuitkd.hooks import Site

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def native():
    return build_model(ModelSpec.preset("student").replace(d_vocab=30, n_ctx=10, n_classes=3), device="cpu")


@pytest.fixture(scope="module")
def bert():
    return build_model(ModelSpec.preset("bert-student", d_vocab=30, n_ctx=10, n_classes=3, d_model=32), device="cpu")


def _data(n=11, pos=10):
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(1, 30, (n, pos), generator=g)
    mask = torch.ones(n, pos, dtype=torch.long)
    lengths = torch.randint(4, pos + 1, (n,), generator=g)
    for i, length in enumerate(lengths.tolist()):
        mask[i, length:] = 0
        toks[i, length:] = 0
    return toks, mask


def test_batched_run_equals_one_forward(native, bert):
    toks, mask = _data()
    sites = [Site(0, "resid_post"), Site(1, "z"), Site(1, "pattern")]
    for model in (native, bert):
        res = run(model, toks, attention_mask=mask, sites=sites, batch_size=4)
        full = run(model, toks, attention_mask=mask, sites=sites, batch_size=len(toks))
        with torch.inference_mode():
            direct = model(toks, attention_mask=mask)
        torch.testing.assert_close(res.logits, direct, atol=1e-5, rtol=0)
        for s in sites:
            torch.testing.assert_close(res.acts[s], full.acts[s], atol=1e-5, rtol=0)
        assert not res.logits.requires_grad  # inference mode: no graph kept


def test_list_inputs_are_right_padded(native):
    seqs = [torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8, 9, 10]), torch.tensor([11])]
    toks, mask = pad_right(seqs)
    assert toks.tolist()[0] == [3, 4, 5, 0, 0] and mask.tolist()[2] == [1, 0, 0, 0, 0]
    res = run(native, seqs, batch_size=2)
    with torch.inference_mode():
        direct = native(toks, attention_mask=mask)
    torch.testing.assert_close(res.logits, direct)
    # padding is masked: the CLS output of a sequence does not depend on what fills its padding
    toks2 = toks.clone()
    toks2[mask == 0] = 17
    torch.testing.assert_close(run(native, toks2, attention_mask=mask).logits[:, 0], res.logits[:, 0], atol=1e-5, rtol=0)


def test_streaming_reducers_equal_whole_activation_reductions(native):
    toks, mask = _data()
    classes = torch.zeros_like(mask, dtype=torch.bool)
    classes[:, 2] = True
    classes[3, 5] = True
    reducers = {
        "mean": Mean(Site(0, "resid_post")),
        "z_tok": TokenClassMean(Site(1, "z"), classes),
        "mass": AttentionMass(native, classes),
        "mass_all": AttentionMass(native, classes, dest="all", layers=[1]),
    }
    res = run(native, toks, attention_mask=mask, reducers=reducers, batch_size=3)
    assert res.acts == {}  # reducers keep nothing whole
    whole = run(native, toks, attention_mask=mask, sites=[Site(0, "resid_post"), Site(1, "z"), Site(0, "pattern"),
                                                           Site(1, "pattern")], batch_size=100).acts
    m = mask.bool()
    torch.testing.assert_close(res.reduced["mean"], whole[Site(0, "resid_post")][m].mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.reduced["z_tok"], whole[Site(1, "z")][classes].mean(0), atol=1e-5, rtol=0)
    for layer in (0, 1):
        pat = whole[Site(layer, "pattern")]
        expected = (pat[:, :, 0, :] * classes[:, None, :]).sum(-1).mean(0)
        torch.testing.assert_close(res.reduced["mass"][layer], expected, atol=1e-5, rtol=0)
    pat = whole[Site(1, "pattern")]
    mass = (pat * classes[:, None, None, :]).sum(-1)  # [b h dest]
    per_ex = (mass * m[:, None]).sum(-1) / m.sum(-1, keepdim=True)
    torch.testing.assert_close(res.reduced["mass_all"][0], per_ex.mean(0), atol=1e-5, rtol=0)


def test_split_and_pairs_inputs(native):
    toks, mask = _data(6)
    split = Split(inputs=toks, labels=torch.zeros(6, dtype=torch.long), bias_labels={},
                  groups=torch.zeros(6, dtype=torch.long), attention_mask=mask)
    a = run(native, split, batch_size=4).logits
    b = run(native, toks, attention_mask=mask).logits
    torch.testing.assert_close(a, b)


def test_grad_mode_keeps_the_graph(native):
    toks, mask = _data(4)
    res = run(native, toks, attention_mask=mask, sites=[Site(1, "resid_pre")], grad=True, batch_size=4)
    res.logits[:, 0].sum().backward()
    assert res.acts[Site(1, "resid_pre")].grad is not None
    native.zero_grad(set_to_none=True)


def test_hooks_removed_after_a_failing_reducer(native):
    before = sum(len(hp.fwd_hooks) for hp in native.hook_dict.values())

    class Broken:
        sites = [Site(0, "z")]

        def update(self, acts, batch):
            raise RuntimeError("reducer failed")

        def result(self):
            return torch.zeros(())

    with pytest.raises(RuntimeError, match="reducer failed"):
        run(native, _data(3)[0], reducers={"x": Broken()})
    assert sum(len(hp.fwd_hooks) for hp in native.hook_dict.values()) == before


def test_bad_inputs_raise(native):
    toks, mask = _data(4)
    with pytest.raises(CircuitKDError, match="attention_mask shape"):
        run(native, toks, attention_mask=mask[:, :5])
    with pytest.raises(CircuitKDError, match="batch_size"):
        run(native, toks, batch_size=0)
    with pytest.raises(CircuitKDError, match="head index 7"):
        run(native, toks, sites=[Site(0, "z", head=7)])
    with pytest.raises(CircuitKDError, match="token mask shape"):
        run(native, toks, reducers={"t": TokenClassMean(Site(0, "resid_pre"), torch.ones(4, 3, dtype=torch.bool))})


def test_mean_keeping_positions_counts_only_real_tokens_at_each_position():
    """Mean(over_positions=False): per position, the mean over the examples with a real token there
    (the mean-ablation value of a per-position activation), streamed over unequal batches."""
    from circuitkd.engine import Batch

    g = torch.Generator().manual_seed(0)
    act = torch.randn(5, 4, 3, 2, generator=g)  # [batch pos head d_head]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    mean = Mean(Site(0, "z"), over_positions=False)
    for idx in (slice(0, 2), slice(2, 5)):
        mean.update({Site(0, "z"): act[idx]}, Batch(torch.zeros(1), mask[idx], idx))
    expected = torch.stack([act[mask[:, p].bool(), p].mean(0) for p in range(4)])
    torch.testing.assert_close(mean.result(), expected)
