"""Robustness metrics: in-distribution, out-of-distribution, per bias type, per group, worst group."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from circuitkd.data.task import Split, Task
from circuitkd.errors import CircuitKDError
from circuitkd.models.build import check_image_input, class_logits, model_device, spec_of


@torch.inference_mode()
def predict_logits(model, split: Split, *, batch_size: int = 256) -> Tensor:
    """Class logits ``[n, n_classes]`` of ``model`` on every example of ``split`` (on the CPU)."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for lo in range(0, len(split), batch_size):
            inputs = split.inputs[lo:lo + batch_size]
            mask = None if split.attention_mask is None else split.attention_mask[lo:lo + batch_size]
            if mask is not None:
                width = int(mask.sum(dim=1).max())
                inputs, mask = inputs[:, :width], mask[:, :width].to(device)
            out.append(class_logits(model, inputs.to(device), mask).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def predictions(model, task: Task, split: Split, *, batch_size: int = 256) -> Tensor:
    """Predicted labels ``[n]`` in the task's label space.

    A task whose gold labels live in a coarser space than the model's outputs (HANS scored
    with a 3-class MNLI model) maps each predicted class through ``task.info["prediction_map"]``.
    """
    pred = predict_logits(model, split, batch_size=batch_size).argmax(-1)
    mapping = task.info.get("prediction_map") if task.info else None
    if mapping is not None:
        pred = torch.as_tensor(mapping, dtype=torch.long)[pred]
    return pred


def _acc(correct: Tensor, mask: Tensor | None = None) -> float:
    if mask is not None:
        correct = correct[mask]
    return float(correct.float().mean()) if correct.numel() else float("nan")


def evaluate(model, task: Task, *, batch_size: int = 256, per_example: bool = False) -> dict[str, Any]:
    """Accuracy of ``model`` on ``task``.

    Returns a dict with ``id_acc``, ``ood_acc``, ``worst_group_acc`` (lowest accuracy over the
    coarse groups -- gold label x the state of one shortcut: absent / aligned / conflicting --
    of every bias type, on id_test ∪ ood_test, groups of at least 5 examples),
    ``fine_worst_group_acc`` (the same over the task's fine groups, every shortcut's state at
    once), ``per_group`` (fine group name -> accuracy on that union), ``per_bias`` (bias type ->
    {"aligned_acc", "conflicting_acc", "gap", "ood_acc", "worst_group_acc", "coarse_groups"}:
    accuracy on id_test ∪ ood_test examples containing that shortcut, split by whether it agrees
    with the gold label; "ood_acc" is accuracy on ood_test examples where that shortcut
    conflicts; "coarse_groups" maps ``"label|bias:state"`` to accuracy), ``n`` (split sizes); with
    ``per_example``, also ``correct`` ({"id_test", "ood_test"} -> ``Bool[n]`` per-example
    correctness, what the study's bootstrap intervals resample).
    """
    n_classes = spec_of(model).n_classes if hasattr(model, "circuitkd_spec") else None
    mapping = task.info.get("prediction_map") if task.info else None
    expected = len(mapping) if mapping is not None else task.n_classes
    if n_classes is not None and n_classes != expected:
        raise CircuitKDError(f"model has {n_classes} classes but task {task.name!r} has {task.n_classes} labels")
    if hasattr(model, "circuitkd_spec"):
        check_image_input(spec_of(model), task)
    id_split, ood_split = task.id_test, task.ood_test
    id_correct = predictions(model, task, id_split, batch_size=batch_size) == id_split.labels
    ood_correct = predictions(model, task, ood_split, batch_size=batch_size) == ood_split.labels
    both = id_split.concat(ood_split) if len(ood_split) else id_split
    correct = torch.cat([id_correct, ood_correct])

    per_group: dict[str, float] = {}
    counts: dict[str, int] = {}
    for g in both.groups.unique().tolist():
        mask = both.groups == g
        name = task.group_names[g] if g < len(task.group_names) else str(g)
        per_group[name] = _acc(correct, mask)
        counts[name] = int(mask.sum())
    eligible = [acc for name, acc in per_group.items() if counts[name] >= 5]
    fine_worst = min(eligible) if eligible else float("nan")

    per_bias: dict[str, dict[str, float]] = {}
    for bias in task.bias_types:
        b_all = both.bias_labels[bias]
        present = b_all >= 0
        aligned = present & (b_all == both.labels)
        conflicting = present & (b_all != both.labels)
        b_ood = ood_split.bias_labels[bias]
        ood_conf = (b_ood >= 0) & (b_ood != ood_split.labels)
        a, c = _acc(correct, aligned), _acc(correct, conflicting)
        # Coarse groups: gold label x this shortcut's state (absent / aligned / conflicting).
        state = torch.where(~present, 0, torch.where(aligned, 1, 2))
        coarse: dict[str, float] = {}
        for label in both.labels.unique().tolist():
            for code, state_name in enumerate(("none", "aligned", "conflicting")):
                mask = (both.labels == label) & (state == code)
                if int(mask.sum()) >= 5:
                    name = task.label_names[label] if label < len(task.label_names) else str(label)
                    coarse[f"{name}|{bias}:{state_name}"] = _acc(correct, mask)
        per_bias[bias] = {"aligned_acc": a, "conflicting_acc": c, "gap": a - c,
                          "ood_acc": _acc(ood_correct, ood_conf), "n_conflicting": int(conflicting.sum()),
                          "worst_group_acc": min(coarse.values()) if coarse else float("nan"),
                          "coarse_groups": coarse}
    coarse_worst = [d["worst_group_acc"] for d in per_bias.values() if not math.isnan(d["worst_group_acc"])]
    return {
        "id_acc": _acc(id_correct),
        "ood_acc": _acc(ood_correct),
        "worst_group_acc": min(coarse_worst) if coarse_worst else fine_worst,
        "fine_worst_group_acc": fine_worst,
        "per_group": per_group,
        "per_bias": per_bias,
        "n": {"id_test": len(id_split), "ood_test": len(ood_split)},
        **({"correct": {"id_test": id_correct, "ood_test": ood_correct}} if per_example else {}),
    }
