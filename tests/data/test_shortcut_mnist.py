"""MNIST with a colour and a cue-patch shortcut: exact rates and agreement, OOD design, coarse groups,
pixels of each shortcut, pairs that flip one shortcut only, and bad input."""
from __future__ import annotations

import pytest
import torch

from circuitkd.data.shortcut_mnist import cue_pattern, render, shortcut_mnist
from circuitkd.errors import CircuitKDError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task():
    return shortcut_mnist(seed=0, strength=0.9, color_rate=0.6, cue_rate=0.5, n_train=800, n_id=200, n_ood=200)


def test_rates_agreement_and_groups(task):
    assert task.bias_types == ("color", "cue") and task.n_classes == 2 and len(task.group_names) == 18
    for name in ("train", "id_test"):
        s = task.split(name)
        for bias, rate in (("color", 0.6), ("cue", 0.5)):
            b = s.bias_labels[bias]
            for y in (0, 1):
                in_y = s.labels == y
                present = in_y & (b >= 0)
                # Exact counts within each label: presence, then agreement among the present.
                assert int(present.sum()) == round(rate * int(in_y.sum()))
                assert int((present & (b != y)).sum()) == round((1 - 0.9) * int(present.sum()))
        # Fine groups: label x colour state x cue state, named as their index says.
        for i in range(len(s)):
            if i % 97:
                continue
            name = task.group_names[int(s.groups[i])]
            y, rest = name.split("|")
            color_state, cue_state = (part.split(":")[1] for part in rest.split(","))
            for bias, state in (("color", color_state), ("cue", cue_state)):
                b = int(s.bias_labels[bias][i])
                assert state == ("none" if b < 0 else "aligned" if b == int(s.labels[i]) else "conflicting")
            assert y == task.label_names[int(s.labels[i])]
    # ood_test: every example carries exactly one shortcut, against its label; half of each label each kind.
    o = task.ood_test
    present = torch.stack([o.bias_labels[b] >= 0 for b in task.bias_types])
    assert torch.equal(present.sum(0), torch.ones(len(o), dtype=torch.long))
    for b in task.bias_types:
        on = o.bias_labels[b] >= 0
        assert torch.equal(o.bias_labels[b][on], 1 - o.labels[on])
        for y in (0, 1):
            n_y = int((o.labels == y).sum())
            assert abs(int((on & (o.labels == y)).sum()) - n_y / 2) <= 0.5


def test_pixels_of_each_shortcut(task):
    s = task.train
    grey = (s.bias_labels["color"] < 0)
    cue = s.bias_labels["cue"]
    x = s.inputs
    # The cue square (rows/cols 1..4) holds the stripe pattern of the cue's label, in every channel.
    for i in torch.nonzero(cue >= 0).flatten()[:20].tolist():
        want = cue_pattern(4, int(cue[i]))
        for c in range(3):
            assert torch.equal(x[i, c, 1:5, 1:5], want)
    assert torch.equal(cue_pattern(4, 0), cue_pattern(4, 1).T) and cue_pattern(4, 0).sum() == cue_pattern(4, 1).sum()
    # Away from the cue, a grey digit is the same in all channels; a coloured one only in its channel.
    body = x[:, :, 6:, :]
    for i in range(0, len(s), 37):
        if grey[i]:
            assert torch.equal(body[i, 0], body[i, 1]) and torch.equal(body[i, 1], body[i, 2])
        else:
            other = [c for c in range(3) if c != int(s.bias_labels["color"][i])]
            assert float(body[i, other].abs().max()) == 0.0 and float(body[i].max()) > 0.2
    # Pixel classes: the cue mask is the square exactly where the cue is; colored only on coloured digits.
    m = s.token_classes["cue"]
    assert torch.equal(m.flatten(1).any(1), cue >= 0)
    assert int(m[cue >= 0][0].sum()) == 16
    assert not s.token_classes["colored"][grey].any()
    assert torch.equal(s.token_classes["colored"] | ~s.token_classes["stroke"], ~s.token_classes["stroke"]
                       | (s.token_classes["stroke"] & ~grey[:, None, None]))


def test_pairs_flip_only_that_shortcut(task):
    for bias in ("color", "cue"):
        pairs = task.shortcut_pairs(24, bias=bias, seed=3)
        assert pairs.meta["bias"] == [bias] * 24
        assert torch.equal(pairs.corrupt_answer, 1 - pairs.clean_answer)
        changed = (pairs.clean != pairs.corrupt).any(1)  # [n height width]
        if bias == "cue":
            outside = changed.clone()
            outside[:, 1:5, 1:5] = False
            assert not outside.any() and changed.any()
        else:
            # Same digit, other channel: only stroke pixels change, and the cue square is empty.
            assert torch.equal(pairs.clean.sum(1), pairs.corrupt.sum(1))
            assert float(pairs.clean[:, :, 1:5, 1:5].abs().max()) == 0.0
    mixed = task.shortcut_pairs(40, seed=0)
    assert set(mixed.meta["bias"]) == {"color", "cue"}


def test_evaluate_reports_coarse_groups_per_bias(task, monkeypatch):
    """evaluate() sees both shortcuts: coarse groups label x state for each, as for the NLI task."""
    from circuitkd.evaluate import evaluate

    class Oracle(torch.nn.Module):  # predicts what the colour says, else what the cue says, else 0
        def forward(self, x):
            red, green = x[:, 0].sum((1, 2)), x[:, 1].sum((1, 2))
            coloured = (x[:, 2, 6:].sum((1, 2)) == 0)
            color_label = (green > red).long()
            cue_label = (x[:, 0, 1:5, 1].sum(-1) == 4).long()  # a vertical stripe lights the whole first column
            has_cue = x[:, 0, 1:5, 1:5].sum((1, 2)) > 0
            pred = torch.where(coloured, color_label, torch.where(has_cue, cue_label, 0))
            return torch.nn.functional.one_hot(pred, 2).float()

    import sys

    ev = sys.modules["circuitkd.evaluate"]  # the package re-exports the function under the module's name
    monkeypatch.setattr(ev, "class_logits", lambda model, inputs, mask=None: model(inputs))
    scores = evaluate(Oracle(), task)
    for bias in ("color", "cue"):
        groups = scores["per_bias"][bias]["coarse_groups"]
        assert {k.split("|")[1] for k in groups} == {f"{bias}:none", f"{bias}:aligned", f"{bias}:conflicting"}
        # The shortcut-follower is always wrong where a shortcut conflicts in ood_test.
        assert scores["per_bias"][bias]["ood_acc"] == 0.0
    assert scores["per_bias"]["color"]["aligned_acc"] == 1.0  # it reads the colour first
    assert scores["ood_acc"] == 0.0 and scores["worst_group_acc"] == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"strength": 1.5}, r"strength must be a number in \[0, 1\], got 1.5"),
    ({"strength": -0.1}, r"strength .* got -0.1"),
    ({"color_rate": 2.0}, r"color_rate .* got 2.0"),
    ({"cue_rate": float("nan")}, r"cue_rate .* got nan"),
    ({"cue_at": (26, 1)}, r"4x4 cue at cue_at=\(26, 1\) does not fit a 28x28 image"),
    ({"cue_size": 30}, r"30x30 cue .* does not fit"),
    ({"cue_size": 1}, r"cue_size must be an integer >= 2.*got 1"),
    ({"seed": -1}, r"seed must be a non-negative integer, got -1"),
    ({"n_ood": 0}, r"n_ood must be a positive integer, got 0"),
    ({"digits": [[0, 1], [1, 7]]}, r"digits must be two .*disjoint.*\[\[0, 1\], \[1, 7\]\]"),
    ({"digits": [[0, 10], [7]]}, r"digits .*got \[\[0, 10\], \[7\]\]"),
    ({"n_train": 4500, "digits": [[0, 1], [6, 7]]}, r"= 6500 exceeds the 2000 MNIST images of digits \[0, 1, 6, 7\]"),
])
def test_bad_input_names_the_value(kwargs, match):
    with pytest.raises(CircuitKDError, match=match):
        shortcut_mnist(**kwargs)


def test_render_refuses_mismatched_lengths():
    with pytest.raises(CircuitKDError, match="3 images but"):
        render(torch.zeros(3, 28, 28), torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long),
               cue_size=4, cue_at=(1, 1))
