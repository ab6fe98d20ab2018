"""circuitkd: does a distilled student keep its debiased teacher's robustness, and which circuits explain it?

Public API (see docs/architecture.md)::

    import circuitkd as ckd
    task = ckd.data.synthetic_nli(seed=0)
    teacher = ckd.train_model(ckd.ModelSpec.preset("teacher"), task, debias="poe", seed=0)
    scores = ckd.evaluate(teacher, task)
"""
from circuitkd import data
from circuitkd.config import DebiasCfg, ExperimentCfg, ModelSpec, TrainCfg
from circuitkd.errors import CircuitKDError
from circuitkd.evaluate import evaluate
from circuitkd.models import ModelPair, build_model, load_checkpoint, save_checkpoint
from circuitkd.train import AttentionTransfer, distill, train_model
from circuitkd.types import Direction, Edge, Node, PromptPairs
from circuitkd.engine import run as run_hooked
from circuitkd.patching import PatchResult, attribution_patch, cross_patch, patch, patch_result, path_patch

__all__ = [
    "CircuitKDError", "Direction", "Edge", "Node", "PromptPairs", "ModelSpec", "TrainCfg", "ModelPair",
    "build_model", "load_checkpoint", "save_checkpoint", "train_model", "distill", "DebiasCfg", "ExperimentCfg", "evaluate", "data",
    "AttentionTransfer",
]
__all__ += ["run_hooked", "patch", "patch_result", "cross_patch", "PatchResult", "path_patch", "attribution_patch"]
from circuitkd.attention import AttentionDiff, AttentionStats, ShortcutHeads, attention_stats, diff_attention, shortcut_heads

__all__ += ["diff_attention", "attention_stats", "shortcut_heads", "AttentionDiff", "AttentionStats", "ShortcutHeads"]
from circuitkd import circuits
from circuitkd.circuits import compare_circuits, discover

__all__ += ["circuits", "discover", "compare_circuits"]
__version__ = "0.1.0"
