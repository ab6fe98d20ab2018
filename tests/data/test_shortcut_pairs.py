"""task.shortcut_pairs: gold vs the shortcut's label, on every task that has shortcut labels."""
import pytest
import torch

import circuitkd as ckd
from circuitkd.data.synthetic_nli import shortcut_labels
from circuitkd.errors import CircuitKDError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def nli():
    return ckd.data.synthetic_nli(seed=0, n_train=600, n_id=200, n_ood=200)


@pytest.fixture(scope="module")
def mnist():
    return ckd.data.colored_mnist(seed=0, n_train=200, n_id=100, n_ood=100)


def _votes(tok, ids, mask) -> dict[str, int]:
    """The label each shortcut present in one encoded pair predicts, read off its words."""
    ids = ids[mask.bool()].tolist()
    first = ids.index(tok.sep_token_id)
    words = lambda xs: tok.decode(xs, skip_special_tokens=True)  # noqa: E731
    return {k: v for k, v in shortcut_labels(words(ids[1:first]), words(ids[first + 1:-1])).items() if v >= 0}


@pytest.mark.parametrize("bias", [None, "overlap", "negation", "cue"])
def test_nli_pairs_conflict_only_on_the_corrupt_side(nli, bias):
    pairs = nli.shortcut_pairs(40, bias=bias, seed=1)
    assert len(pairs) == 40 and pairs.clean.shape == pairs.corrupt.shape
    assert (pairs.clean_answer != pairs.corrupt_answer).all()
    assert pairs.attention_mask[:, -1].any(), "cut to the longest real length"
    for i in range(len(pairs)):
        gold, flipped = int(pairs.clean_answer[i]), pairs.meta["bias"][i]
        assert bias is None or flipped == bias
        clean = _votes(nli.tokenizer, pairs.clean[i], pairs.attention_mask[i])
        corrupt = _votes(nli.tokenizer, pairs.corrupt[i], pairs.attention_mask[i])
        assert clean.get(flipped, gold) == gold, (i, flipped, clean)
        assert corrupt[flipped] == int(pairs.corrupt_answer[i]) != gold, (i, flipped, corrupt)
        assert (pairs.clean[i] != pairs.corrupt[i]).sum() <= 2


def test_colored_mnist_pairs_flip_the_colour_against_the_label(mnist):
    pairs = mnist.shortcut_pairs(16, seed=2)
    assert pairs.clean.shape == pairs.corrupt.shape == (16, 3, 28, 28)
    colour = lambda x: x.sum((2, 3))[:, :2].argmax(1)  # noqa: E731  (0 red, 1 green)
    assert torch.equal(colour(pairs.clean), pairs.clean_answer)
    assert torch.equal(colour(pairs.corrupt), pairs.corrupt_answer)
    assert (pairs.clean_answer != pairs.corrupt_answer).all()
    assert torch.equal(pairs.clean.sum(1), pairs.corrupt.sum(1)), "same digit, other colour"


def test_pairs_are_deterministic_and_seeded(nli):
    a, b, c = nli.shortcut_pairs(12, seed=3), nli.shortcut_pairs(12, seed=3), nli.shortcut_pairs(12, seed=4)
    assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupt_answer, b.corrupt_answer)
    assert not torch.equal(a.clean, c.clean)


def test_counterfactual_pairs_keep_the_gold_label_on_both_sides(nli):
    # Why shortcut_pairs exists: flipping only the shortcut leaves the answers equal.
    raw = nli.counterfactual_pairs(n=32, flip="shortcut")
    assert torch.equal(raw.clean_answer, raw.corrupt_answer)


def test_bad_requests(nli):
    with pytest.raises(CircuitKDError, match="n >= 1"):
        nli.shortcut_pairs(0)
    with pytest.raises(CircuitKDError, match="unknown bias type 'color'"):
        nli.shortcut_pairs(4, bias="color")
    plain = ckd.data.Task(name="plain", modality="text", n_classes=3, label_names=("a", "b", "c"), bias_types=(),
                          group_names=(), splits={"train": nli.train})
    with pytest.raises(CircuitKDError, match="'plain' cannot generate counterfactual pairs"):
        plain.shortcut_pairs(4)
