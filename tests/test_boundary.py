"""Issue 16, row by row: bad pairs and bad metrics are a one-line CircuitKDError, never a raw
traceback or a silent NaN result."""
import pytest
import torch

import circuitkd as ckd
from circuitkd import CircuitKDError, ModelSpec, PromptPairs, build_model
from circuitkd.metrics import read_logits

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    spec = ModelSpec(backbone="native", n_layers=1, d_model=16, n_heads=2, d_vocab=20, n_ctx=8, n_classes=3)
    return build_model(spec, device="cpu")


def _pairs(n: int = 4, **changes) -> PromptPairs:
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, 20, (n, 8), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1:4] = torch.randint(1, 20, (n, 3), generator=g)
    gold = torch.arange(n) % 3
    fields = dict(clean=clean, corrupt=corrupt, clean_answer=gold, corrupt_answer=(gold + 1) % 3)
    fields.update(changes)
    return PromptPairs(**fields)


def _patch(m, p, **kw):
    return ckd.patch(m, p, site="head", **kw)


def _discover(m, p, **kw):
    return ckd.discover(m, p, method="eap", top_k=3, **kw)


def _discover_exact(m, p, **kw):
    return ckd.discover(m, p, method="exact", top_k=3, **kw)


def _discover_acdc(m, p, **kw):
    return ckd.discover(m, p, method="acdc", criterion="metric", **kw)


ENTRY_POINTS = [_patch, _discover, _discover_exact, _discover_acdc]
ids = lambda f: f.__name__.strip("_")  # noqa: E731


@pytest.mark.parametrize("run", ENTRY_POINTS, ids=ids)
def test_answer_id_outside_the_classes(model, run):
    with pytest.raises(CircuitKDError, match=r"pairs.clean_answer holds id 7 but the model has 3 outputs"):
        run(model, _pairs(clean_answer=torch.tensor([7, 0, 1, 2])))
    # the prob metric gathers instead of indexing: same message, not a raw gather error
    with pytest.raises(CircuitKDError, match=r"holds id 7 but the model has 3 outputs"):
        run(model, _pairs(clean_answer=torch.tensor([7, 0, 1, 2])), metric="prob")


@pytest.mark.parametrize("bad", [torch.tensor([0.0, 1.0, float("nan"), 2.0]), torch.tensor([0.5, 1.0, 0.0, 2.0]),
                                 torch.tensor([True, False, True, False])])
def test_nan_or_float_answers(bad):
    with pytest.raises(CircuitKDError, match=r"clean_answer must hold integer class \(or token\) ids, got dtype"):
        _pairs(clean_answer=bad)


def test_negative_answers_and_token_ids():
    with pytest.raises(CircuitKDError, match="corrupt_answer holds negative class id -1"):
        _pairs(corrupt_answer=torch.tensor([-1, 0, 1, 2]))
    clean = torch.ones(4, 8, dtype=torch.long)
    clean[2, 3] = -5
    with pytest.raises(CircuitKDError, match="clean holds negative token id -5"):
        _pairs(clean=clean, corrupt=torch.ones(4, 8, dtype=torch.long))


def test_non_finite_pixels_and_bad_input_dtypes():
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(CircuitKDError, match="clean pixels hold non-finite values"):
        PromptPairs(clean=x, corrupt=torch.zeros(2, 3, 4, 4), clean_answer=torch.tensor([0, 1]), corrupt_answer=torch.tensor([1, 0]))
    with pytest.raises(CircuitKDError, match="clean must hold integer token ids or float pixels, got dtype torch.bool"):
        PromptPairs(clean=torch.ones(2, 4, dtype=torch.bool), corrupt=torch.ones(2, 4, dtype=torch.bool),
                    clean_answer=torch.tensor([0, 1]), corrupt_answer=torch.tensor([1, 0]))


@pytest.mark.parametrize("run", ENTRY_POINTS, ids=ids)
def test_token_id_outside_the_vocabulary(model, run):
    clean = torch.randint(1, 20, (4, 8))
    clean[1, 2] = 25
    with pytest.raises(CircuitKDError, match="pairs hold token id 25 but the model's vocabulary has 20 ids"):
        run(model, _pairs(clean=clean, corrupt=clean.clone()))


def _nan_metric(logits, pairs, clean_logits=None):
    return read_logits(logits, pairs)[:, 0] * float("nan")


def _constant_metric(logits, pairs, clean_logits=None):
    return torch.ones(logits.shape[0])


@pytest.mark.parametrize("run", ENTRY_POINTS, ids=ids)
def test_metric_that_returns_nan(model, run):
    with pytest.raises(CircuitKDError, match=r"metric '_nan_metric' returned a non-finite value \(NaN or inf\)"):
        run(model, _pairs(), metric=_nan_metric)


def test_metric_that_does_not_depend_on_the_logits(model):
    with pytest.raises(CircuitKDError, match="metric '_constant_metric' does not depend on the logits"):
        _discover(model, _pairs(), metric=_constant_metric)
    with pytest.raises(CircuitKDError, match="metric '_constant_metric' does not depend on the logits"):
        ckd.discover(model, _pairs(), method="eap-ig", metric=_constant_metric, steps=2)


def test_metric_that_does_not_depend_on_the_logits_without_gradients(model):
    # exact patching needs no gradient: a constant metric makes clean and corrupt agree, refused too
    with pytest.raises(CircuitKDError, match="the metric is the same on clean"):
        ckd.patch(model, _pairs(), site="head", metric=_constant_metric)


def test_discover_unknown_keyword(model):
    with pytest.raises(CircuitKDError, match=r"discover\(method='eap'\) got unknown keyword\(s\) \['stepz'\]; "
                                             r"eap takes \['direction', 'mean_values'\]"):
        ckd.discover(model, _pairs(), method="eap", stepz=3)
    with pytest.raises(CircuitKDError, match=r"unknown keyword\(s\) \['bogus'\]"):
        ckd.discover(model, _pairs(), method="acdc", bogus=1)
