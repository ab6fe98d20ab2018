"""Bias-only models: per-example probabilities ``p_bias(y | x)`` that a shortcut alone gives.

Every "bias-product" debiasing method (reweighting, product of experts, learned-mixin,
debiased focal loss, confidence regularisation) needs, for each training example, the
class distribution predicted by a model that can only see the shortcut.

* Known shortcuts (Clark, Yatskar & Zettlemoyer 2019, "Don't Take the Easy Way Out",
  arXiv 1909.03683; He, Zha & Wang 2019; Karimi Mahabadi et al. 2020, arXiv 1909.06321):
  a small multinomial logistic model fitted on the training split using only the
  per-example shortcut indicators the task annotates (``Split.bias_labels``: which label
  the lexical-overlap / negation / hypothesis-only cue word / colour predicts, or absent).
  One such model per bias type (``"overlap"``, ``"negation"``, ``"cue"``, ``"color"``), or
  one over all of them together (``"all"``). Because the features are the shortcuts and
  nothing else, it is exactly as good as the shortcut on any split, and at chance where
  the shortcut is decorrelated from the label.
* Unknown biases (Utama, Moosavi & Gurevych 2020b, "Towards Debiasing NLU Models from
  Unknown Biases", arXiv 2009.12303): a "shallow" model, here the main model's architecture
  trained briefly on a small random subset of the training data, whose (over-)confident
  predictions on the rest of the data mark what is easy to learn, i.e. the shortcuts.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from circuitkd.config import ModelSpec, TrainCfg
from circuitkd.data.task import Split, Task
from circuitkd.errors import CircuitKDError

# Keep bias probabilities away from 0 and 1: log p_bias enters PoE / learned-mixin, and
# 1 - p_bias is a weight that must not vanish for every example of a group.
_EPS = 1e-4


def bias_features(split: Split, biases: Sequence[str], n_classes: int) -> Float[Tensor, "n feature"]:
    """One-hot shortcut indicators: for each bias type, which label it predicts (or "absent")."""
    feats = []
    for name in biases:
        if name not in split.bias_labels:
            raise CircuitKDError(f"unknown bias type {name!r}; this split has {sorted(split.bias_labels)}")
        b = split.bias_labels[name].long()
        # Column 0 = shortcut absent (-1), columns 1..n_classes = predicted label.
        feats.append(F.one_hot((b + 1).clamp(min=0), n_classes + 1).float())
    return torch.cat(feats, dim=1)


def _fit_logistic(x: Tensor, y: Tensor, n_classes: int, *, l2: float, steps: int = 200) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS (a convex fit: no seed needed)."""
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    x64 = x.double()
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x64 @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def known_bias_probs(task: Task, bias: str = "all", *, split: Optional[Split] = None,
                     l2: float = 1e-3) -> Float[Tensor, "n n_classes"]:
    """``p_bias`` of a logistic model on shortcut indicators, fitted on ``task.train``.

    Args:
        task: the task whose ``bias_types`` are annotated on every split.
        bias: a bias type (e.g. "overlap", "negation", "cue", "color") or "all" for one
            model over every annotated shortcut.
        split: where to predict (``task.train`` by default; e.g. train + augmentation).
        l2: ridge penalty, which also smooths the estimate for rare indicator values.
    """
    biases = _resolve_biases(task, bias)
    x_train = bias_features(task.train, biases, task.n_classes)
    w, b = _fit_logistic(x_train, task.train.labels, task.n_classes, l2=l2)
    target = task.train if split is None else split
    probs = torch.softmax(bias_features(target, biases, task.n_classes).double() @ w + b, dim=-1).float()
    return _clip(probs)


def _resolve_biases(task: Task, bias: str) -> list[str]:
    if bias == "all":
        if not task.bias_types:
            raise CircuitKDError(f"task {task.name!r} annotates no bias types, so no known-bias model exists")
        return list(task.bias_types)
    if bias not in task.bias_types:
        raise CircuitKDError(
            f"unknown bias {bias!r} for task {task.name!r}; expected 'all', 'unknown' or one of {task.bias_types}"
        )
    return [bias]


def _clip(probs: Tensor) -> Tensor:
    probs = probs.clamp(_EPS, 1.0 - _EPS)
    return probs / probs.sum(dim=-1, keepdim=True)


def unknown_bias_probs(task: Task, spec: ModelSpec, *, split: Optional[Split] = None, n_examples: int = 500,
                       steps: int = 100, seed: int = 0, cfg: Optional[TrainCfg] = None,
                       device=None) -> Float[Tensor, "n n_classes"]:
    """``p_bias`` of a shallow model: ``spec`` trained for ``steps`` on ``n_examples`` random train examples.

    Following Utama et al. (2020b) the shallow model is the same kind of model trained on a
    small subset, so it only picks up what is easiest to learn; its predictions on every
    example of ``split`` (``task.train`` by default) are the bias probabilities.
    """
    from circuitkd.evaluate import predict_logits
    from circuitkd.models.build import build_model
    from circuitkd.train.loop import train_loop

    train = task.train
    g = torch.Generator().manual_seed(10_007 * seed + 17)
    subset = torch.randperm(len(train), generator=g)[:min(n_examples, len(train))]
    base = cfg or TrainCfg()
    shallow_cfg = base.replace(steps=steps, seed=seed + 1, checkpoint_every=0, eval_every=0)
    model = build_model(spec.replace(seed=seed + 1), task, device=device)
    train_loop(model, train.subset(subset), shallow_cfg, desc="unknown-bias model")
    logits = predict_logits(model, train if split is None else split)
    return _clip(torch.softmax(logits, dim=-1))


def bias_probs(task: Task, bias: str, *, spec: Optional[ModelSpec] = None, split: Optional[Split] = None,
               seed: int = 0, cfg: Optional[TrainCfg] = None, unknown_examples: int = 500,
               unknown_steps: int = 100, device=None) -> Float[Tensor, "n n_classes"]:
    """Bias-only probabilities for ``bias``: a known bias type, "all" known ones, or "unknown"."""
    if bias == "unknown":
        if spec is None:
            raise CircuitKDError("the 'unknown' bias model needs the model spec to train a shallow copy")
        return unknown_bias_probs(task, spec, split=split, n_examples=unknown_examples, steps=unknown_steps,
                                  seed=seed, cfg=cfg, device=device)
    return known_bias_probs(task, bias, split=split)
