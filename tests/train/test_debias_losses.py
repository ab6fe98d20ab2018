"""Each debiasing loss against a value computed by hand on a two-example batch."""
import math

import pytest
import torch

from circuitkd.errors import CircuitKDError
from circuitkd.train import debias as D

# Two examples, three classes. Hand-computed softmaxes below use these numbers.
LOGITS = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
LABELS = torch.tensor([0, 2])
BIAS = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.6, 0.2]])


def _lse(xs):
    return math.log(sum(math.exp(x) for x in xs))


# Per-example CE: -log softmax(logits)[y].
CE0 = -(2.0 - _lse([2.0, 0.0, 0.0]))   # 0.2395
CE1 = -(0.0 - _lse([0.0, 1.0, 0.0]))   # 1.5514


def test_reweight_hand_value():
    w0, w1 = 1 - 0.8, 1 - 0.2
    expected = (w0 * CE0 + w1 * CE1) / (w0 + w1)
    assert D.reweight_loss(LOGITS, LABELS, BIAS).item() == pytest.approx(expected, rel=1e-6)


def test_poe_hand_value():
    # log p_main + log p_bias, renormalised: CE of the product distribution.
    def ce(logits, bias, y):
        lp = [l - _lse(logits) + math.log(b) for l, b in zip(logits, bias)]
        return -(lp[y] - _lse(lp))

    expected = (ce([2, 0, 0], [0.8, 0.1, 0.1], 0) + ce([0, 1, 0], [0.2, 0.6, 0.2], 2)) / 2
    assert D.poe_loss(LOGITS, LABELS, BIAS).item() == pytest.approx(expected, rel=1e-6)
    # With a uniform bias expert PoE is plain cross-entropy.
    assert D.poe_loss(LOGITS, LABELS, torch.full((2, 3), 1 / 3)).item() == pytest.approx((CE0 + CE1) / 2, rel=1e-6)


def test_learned_mixin_h_hand_value():
    gate = torch.tensor([0.5, 2.0])
    w_h = 0.1

    def parts(logits, bias, g, y):
        sb = [g * math.log(b) for b in bias]
        lp = [l - _lse(logits) + s for l, s in zip(logits, sb)]
        ce = -(lp[y] - _lse(lp))
        q = [math.exp(s - _lse(sb)) for s in sb]
        ent = -sum(qi * math.log(qi) for qi in q)
        return ce, ent

    c0, e0 = parts([2, 0, 0], [0.8, 0.1, 0.1], 0.5, 0)
    c1, e1 = parts([0, 1, 0], [0.2, 0.6, 0.2], 2.0, 2)
    expected = (c0 + c1) / 2 + w_h * (e0 + e1) / 2
    got = D.learned_mixin_h_loss(LOGITS, LABELS, BIAS, gate, w_h).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # gate = 1 and no entropy term is PoE.
    assert D.learned_mixin_h_loss(LOGITS, LABELS, BIAS, torch.ones(2), 0.0).item() == pytest.approx(
        D.poe_loss(LOGITS, LABELS, BIAS).item(), rel=1e-6)


def test_focal_hand_value():
    gamma = 2.0
    expected = ((1 - 0.8) ** gamma * CE0 + (1 - 0.2) ** gamma * CE1) / 2
    assert D.focal_loss(LOGITS, LABELS, BIAS, gamma).item() == pytest.approx(expected, rel=1e-6)
    assert D.focal_loss(LOGITS, LABELS, BIAS, 0.0).item() == pytest.approx((CE0 + CE1) / 2, rel=1e-6)


def test_confreg_hand_value():
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    # beta = p_bias(gold) = 0.8 and 0.2; S_j ∝ p_t,j ** (1 - beta)
    s0 = [p ** 0.2 for p in (0.7, 0.2, 0.1)]
    s1 = [p ** 0.8 for p in (0.1, 0.3, 0.6)]
    s0 = [x / sum(s0) for x in s0]
    s1 = [x / sum(s1) for x in s1]
    lp0 = [l - _lse([2, 0, 0]) for l in (2, 0, 0)]
    lp1 = [l - _lse([0, 1, 0]) for l in (0, 1, 0)]
    expected = (-sum(a * b for a, b in zip(s0, lp0)) - sum(a * b for a, b in zip(s1, lp1))) / 2
    assert D.confreg_loss(LOGITS, LABELS, BIAS, teacher).item() == pytest.approx(expected, rel=1e-6)
    scaled = D.scaled_teacher_probs(teacher, LABELS, BIAS)
    assert scaled[0].tolist() == pytest.approx(s0, rel=1e-6)
    # A strongly biased example gets a flatter target than the teacher's.
    assert scaled[0].max() < teacher[0].max()


def test_group_dro_hand_value():
    per_example = torch.tensor([1.0, 3.0, 2.0])
    groups = torch.tensor([0, 0, 2])          # group 1 absent from the batch
    q = torch.tensor([0.5, 0.25, 0.25])
    eta = 0.1
    group_loss = [2.0, 0.0, 2.0]              # means per group (0 for the absent one)
    raw = [qi * math.exp(eta * l) for qi, l in zip([0.5, 0.25, 0.25], group_loss)]
    new_q = [r / sum(raw) for r in raw]
    expected = sum(qi * l for qi, l in zip(new_q, group_loss))
    loss, got_q = D.group_dro_step(per_example, groups, q, eta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert got_q.tolist() == pytest.approx(new_q, rel=1e-6)
    # The worst group gains weight.
    loss, q2 = D.group_dro_step(torch.tensor([5.0, 0.0]), torch.tensor([1, 0]), torch.full((3,), 1 / 3), 1.0)
    assert q2.argmax().item() == 1


def test_jtt_upweighted_hand_value():
    weights = torch.tensor([1.0, 6.0])
    expected = (1.0 * CE0 + 6.0 * CE1) / 2 / 2.5
    assert D.upweighted_loss(LOGITS, LABELS, weights, 2.5).item() == pytest.approx(expected, rel=1e-6)


def test_gradients_flow_to_logits():
    logits = LOGITS.clone().requires_grad_(True)
    for loss in (D.reweight_loss(logits, LABELS, BIAS), D.poe_loss(logits, LABELS, BIAS),
                 D.focal_loss(logits, LABELS, BIAS, 2.0)):
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_unknown_method_lists_known_ones():
    from tests.train.toy import toy_task

    task = toy_task(0, n_train=64, n_test=16)
    with pytest.raises(CircuitKDError, match="unknown debiasing method 'pope'.*poe.*jtt"):
        D.make_objective("pope", task, model=None)
    with pytest.raises(CircuitKDError, match="uses no bias-only model"):
        D.make_objective("jtt:overlap", task, model=None)
