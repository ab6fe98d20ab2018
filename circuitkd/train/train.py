"""``train_model``: build a model from a spec and train it on a task, plainly or with a debiasing loss."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

from circuitkd.config import ModelSpec, TrainCfg
from circuitkd.data.task import Task
from circuitkd.models.build import build_model
from circuitkd.models.checkpoint import is_checkpoint, load_checkpoint, save_checkpoint
from circuitkd.train.loop import LossFn, cross_entropy_loss, is_main_process, train_loop


def partial_dir(checkpoint: str | Path) -> Path:
    """Where an unfinished run keeps its resumable state, beside the final checkpoint."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent / f"{checkpoint.name}.partial"


def objective(debias: str, task: Task, model, *, cfg: TrainCfg, seed: int, **options) -> tuple[LossFn, list]:
    """The loss for ``debias`` ("none" = cross-entropy) and any extra trainable parameters it owns.

    ``options`` go to :func:`circuitkd.train.debias.make_objective` (``teacher=``, ``options=``, ``split=``).
    """
    if debias in (None, "none"):
        return cross_entropy_loss, []
    from circuitkd.train import debias as debias_mod

    return debias_mod.make_objective(debias, task, model, cfg=cfg, seed=seed, **options)


def train_model(spec: ModelSpec, task: Task, *, debias: str = "none", seed: int = 0,
                cfg: Optional[TrainCfg] = None, device: Optional[str | torch.device] = None,
                checkpoint: Optional[str | Path] = None, desc: Optional[str] = None,
                debias_options: Optional[dict] = None):
    """Build ``spec`` for ``task`` and train it; returns the trained ``TransformerBridge``.

    Args:
        spec: the model to build (sizes the spec leaves open come from the task).
        task: the task; its ``train`` split is used.
        debias: "none" or a debiasing method name (see ``circuitkd.train.debias.METHODS``).
        seed: seeds the model's initialisation and the batch order.
        cfg: optimisation settings (``TrainCfg()`` by default; its seed is replaced by ``seed``).
        device: where to build the model (CUDA when available by default).
        checkpoint: a folder; if it already holds a finished checkpoint the model is loaded
            from it instead of trained, and an interrupted run resumes from its partial state.
        debias_options: keyword arguments for the debiasing objective, e.g.
            ``{"options": DebiasCfg(...), "teacher": plain_model}`` (see ``make_objective``).
    """
    cfg = (cfg or TrainCfg()).replace(seed=seed)
    if checkpoint is not None and is_checkpoint(checkpoint):
        # A folder holding another architecture is an error, not a silently returned model.
        return load_checkpoint(checkpoint, device=device, expect=None if spec.pretrained else spec)
    model = build_model(spec.replace(seed=seed), task, device=device)
    loss_fn, extra = objective(debias, task, model, cfg=cfg, seed=seed, **(debias_options or {}))
    resume = partial_dir(checkpoint) if checkpoint is not None else None
    if resume is not None and cfg.checkpoint_every == 0:
        cfg = cfg.replace(checkpoint_every=max(50, cfg.steps // 5))
    result = train_loop(model, task.train, cfg, loss_fn=loss_fn, resume_dir=resume,
                        desc=desc or f"train {spec.backbone} {spec.n_layers}L ({debias})",
                        params=list(model.parameters()) + list(extra))
    model.circuitkd_train = {"debias": debias, "seed": seed, "train_cfg": cfg.to_dict(),
                             "seconds": result.seconds, "final_loss": result.losses[-1]}
    if checkpoint is not None and is_main_process():
        save_checkpoint(model, checkpoint, config={"task": task.name, "task_source": task.info.get("source"), **model.circuitkd_train},
                        tokenizer=task.tokenizer)
        shutil.rmtree(resume, ignore_errors=True)
    return model
