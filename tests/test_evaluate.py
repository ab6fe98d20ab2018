import math

import torch

from circuitkd.config import ModelSpec
from circuitkd.evaluate import evaluate
from circuitkd.models import attach_spec


class ShortcutModel(torch.nn.Module):
    """Predicts whatever the shortcut token at position 1 says (7 -> class 1)."""

    def forward(self, tokens, attention_mask=None):
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], 2)
        logits[:, 0, 1] = (tokens[:, 1] == 7).float()
        logits[:, 0, 0] = 0.5
        return logits


def test_metrics_of_a_pure_shortcut_model(toy_task):
    model = attach_spec(ShortcutModel(), ModelSpec.preset("tiny", n_classes=2, d_vocab=20, n_ctx=8))
    scores = evaluate(model, toy_task)
    id_split = toy_task.id_test
    expected_id = float((id_split.bias_labels["token"] == id_split.labels).float().mean())
    assert math.isclose(scores["id_acc"], expected_id, abs_tol=1e-6)
    assert scores["ood_acc"] == 0.0
    assert scores["worst_group_acc"] == 0.0
    assert scores["per_bias"]["token"]["aligned_acc"] == 1.0
    assert scores["per_bias"]["token"]["conflicting_acc"] == 0.0
    assert set(scores["per_group"]) <= set(toy_task.group_names)
    assert scores["per_group"]["1|aligned"] == 1.0


def test_prediction_map_scores_a_three_class_model_on_a_two_class_task(toy_task):
    """HANS-style scoring: classes 1 and 2 both count as label 1."""
    class AlwaysTwo(torch.nn.Module):
        def forward(self, tokens, attention_mask=None):
            logits = torch.zeros(tokens.shape[0], tokens.shape[1], 3)
            logits[:, 0, 2] = 1.0
            return logits

    toy_task.info["prediction_map"] = (0, 1, 1)
    model = attach_spec(AlwaysTwo(), ModelSpec.preset("tiny", n_classes=3, d_vocab=20, n_ctx=8))
    scores = evaluate(model, toy_task)
    assert math.isclose(scores["id_acc"], float((toy_task.id_test.labels == 1).float().mean()), abs_tol=1e-6)
