"""circuitkd.metrics: the metric names, and pairs refused where they enter an answer-contrasting metric."""
import pytest
import torch

import circuitkd as ckd
from circuitkd import CircuitKDError, ModelSpec, PromptPairs, build_model
from circuitkd.metrics import METRICS, KLToClean, evaluate_metric, logit_diff, prob_diff, read_logits, resolve_metric

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    spec = ModelSpec(backbone="native", n_layers=2, d_model=32, n_heads=2, d_vocab=20, n_ctx=8, n_classes=3)
    return build_model(spec, device="cpu")


def _pairs(same_answers: bool, n: int = 6) -> PromptPairs:
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, 20, (n, 8), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1:4] = torch.randint(1, 20, (n, 3), generator=g)
    gold = torch.arange(n) % 3
    return PromptPairs(clean=clean, corrupt=corrupt, clean_answer=gold,
                       corrupt_answer=gold.clone() if same_answers else (gold + 1) % 3)


# Every public function that takes pairs and a metric, called with its default metric.
def _patch(m, p, **kw):
    return ckd.patch(m, p, site="head", **kw)


def _path_patch(m, p, **kw):
    return ckd.path_patch(m, p, senders=[(0, 0)], **kw)


def _attribution(m, p, **kw):
    return ckd.attribution_patch(m, p, site="head", **kw)


def _discover(m, p, **kw):
    return ckd.discover(m, p, method="eap", top_k=3, **kw)


def _faithfulness(m, p, **kw):
    circuit = ckd.discover(m, _pairs(same_answers=False), method="eap", top_k=3)
    return ckd.circuits.faithfulness(m, p, circuit, fractions=(0.5, 1.0), **kw)


ENTRY_POINTS = [_patch, _path_patch, _attribution, _discover, _faithfulness]


@pytest.mark.parametrize("run", ENTRY_POINTS, ids=lambda f: f.__name__.strip("_"))
def test_pairs_with_equal_answers_are_refused_with_the_fix(model, run):
    with pytest.raises(CircuitKDError, match=r"clean_answer equals pairs.corrupt_answer on all 6 pairs.*"
                                             r"use task.shortcut_pairs\(n\).*metric that does not need differing"):
        run(model, _pairs(same_answers=True))
    with pytest.raises(CircuitKDError, match="'prob_diff' is 0 on every run"):
        run(model, _pairs(same_answers=True), metric="prob_diff")


@pytest.mark.parametrize("run", ENTRY_POINTS, ids=lambda f: f.__name__.strip("_"))
def test_a_metric_that_needs_no_answers_takes_those_pairs(model, run):
    run(model, _pairs(same_answers=True), metric="kl")
    run(model, _pairs(same_answers=True), metric=lambda logits, pairs, clean_logits=None: read_logits(logits, pairs)[:, 0])


def test_pairs_differing_somewhere_are_accepted():
    pairs = _pairs(same_answers=True)
    pairs.corrupt_answer[0] = (pairs.clean_answer[0] + 1) % 3
    assert resolve_metric(None, pairs) is logit_diff


def test_names_resolve_alike_and_metrics_read_raw_or_read_out_logits():
    pairs = _pairs(same_answers=False)
    assert set(METRICS) == {"logit_diff", "prob_diff", "prob", "kl"}
    assert resolve_metric("logit_diff", pairs) is logit_diff and resolve_metric("prob_diff", pairs) is prob_diff
    raw = torch.randn(6, 8, 3)
    read = raw[:, 0]
    for name in METRICS:
        m = resolve_metric(name, pairs)
        torch.testing.assert_close(evaluate_metric(m, raw, pairs, raw), evaluate_metric(m, read, pairs, read))
    gold, other = pairs.clean_answer, pairs.corrupt_answer
    ar = torch.arange(6)
    torch.testing.assert_close(logit_diff(read, pairs), read[ar, gold] - read[ar, other])
    p = read.softmax(-1)
    torch.testing.assert_close(prob_diff(read, pairs), p[ar, gold] - p[ar, other])
    # KL to the clean run is 0 on the clean run and repeats the clean rows for stacked copies
    assert evaluate_metric(KLToClean(), read, pairs, read).abs().max() < 1e-6
    stacked = torch.cat([read, read + torch.randn(6, 3)])
    big = PromptPairs(clean=pairs.clean.repeat(2, 1), corrupt=pairs.corrupt.repeat(2, 1),
                      clean_answer=gold.repeat(2), corrupt_answer=other.repeat(2))
    assert evaluate_metric(KLToClean(), stacked, big, read)[:6].abs().max() < 1e-6


def test_bad_metrics():
    pairs = _pairs(same_answers=False)
    with pytest.raises(CircuitKDError, match="unknown metric 'logitdiff'"):
        resolve_metric("logitdiff", pairs)
    with pytest.raises(CircuitKDError, match="compares with the clean run's logits"):
        evaluate_metric(KLToClean(), torch.randn(6, 3), pairs)


def test_a_metric_without_the_clean_logits_argument_is_refused_naming_the_signature():
    pairs = _pairs(same_answers=False)
    with pytest.raises(CircuitKDError, match=r"metric\(logits, pairs, clean_logits=None\)"):
        evaluate_metric(lambda logits, pairs: logits[:, 0], torch.zeros(len(pairs), 3), pairs)
