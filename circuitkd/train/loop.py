"""The training loop for circuitkd bridges: AdamW, linear warm-up then linear decay.

Batches are drawn from a seeded generator, so a run is deterministic on CPU, and the
loop can resume from its last checkpoint (weights, optimiser, schedule, sampler state)
after an interruption. A non-finite loss stops it with a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from circuitkd.config import TrainCfg
from circuitkd.data.task import Split
from circuitkd.errors import CircuitKDError
from circuitkd.models.build import class_logits, model_device, spec_of
from circuitkd.models.checkpoint import (
    is_checkpoint, load_full_state_dict, read_checkpoint_state, save_checkpoint,
)


@dataclass
class Batch:
    """One training batch on the model's device.

    ``index`` holds the examples' positions in the training split, so losses can look up
    per-example quantities (bias-model probabilities, teacher logits, JTT weights).
    """

    inputs: Tensor
    labels: Tensor
    index: Tensor
    groups: Tensor
    attention_mask: Optional[Tensor] = None

    def logits(self, model) -> Tensor:
        """Class logits ``[batch, n_classes]`` of ``model`` on this batch."""
        return class_logits(model, self.inputs, self.attention_mask)


LossFn = Callable[[Any, Batch, int], Tensor]


def cross_entropy_loss(model, batch: Batch, step: int) -> Tensor:
    """Plain cross-entropy on the gold labels."""
    return F.cross_entropy(batch.logits(model), batch.labels)


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0


def lr_lambda(cfg: TrainCfg) -> Callable[[int], float]:
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warmup))

    return f


class BatchSampler:
    """Seeded epoch-wise shuffling; its state is a (epoch, offset) pair, so resuming is exact."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n == 0:
            raise CircuitKDError("cannot train on an empty split")
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def next(self) -> Tensor:
        if self.offset + self.batch_size > self.n:
            self.epoch, self.offset = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        idx = self._perm[self.offset:self.offset + self.batch_size]
        self.offset += self.batch_size
        return idx

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation(self.epoch)


def make_batch(split: Split, idx: Tensor, device: torch.device) -> Batch:
    inputs = split.inputs[idx]
    mask = None if split.attention_mask is None else split.attention_mask[idx]
    if mask is not None:
        # Trim shared right padding: shorter batches are faster and give the same outputs.
        width = int(mask.sum(dim=1).max())
        inputs, mask = inputs[:, :width], mask[:, :width]
    return Batch(
        inputs=inputs.to(device),
        labels=split.labels[idx].to(device),
        index=idx.to(device),
        groups=split.groups[idx].to(device),
        attention_mask=None if mask is None else mask.to(device),
    )


def train_loop(model, split: Split, cfg: TrainCfg, *, loss_fn: LossFn = cross_entropy_loss,
               resume_dir: Optional[str | Path] = None, desc: str = "train",
               params: Optional[list[torch.nn.Parameter]] = None) -> TrainResult:
    """Train ``model`` in place on ``split`` for ``cfg.steps`` steps.

    Args:
        model: a circuitkd bridge; trained on its own device.
        split: the training examples (see :class:`circuitkd.data.Split`).
        cfg: optimiser, schedule and budget.
        loss_fn: ``(model, batch, step) -> scalar`` loss; cross-entropy by default.
        resume_dir: where the loop keeps its resumable state every ``cfg.checkpoint_every``
            steps; if it already holds state from an interrupted run, training continues from it.
        params: parameters to optimise (default: all of the model's, plus none of the loss's);
            pass extra ones (e.g. a learned-mixin gate) here.
    """
    import time

    device = model_device(model)
    n_classes = spec_of(model).n_classes
    if n_classes is not None and len(split):
        hi = int(split.labels.max())
        if hi >= n_classes or int(split.labels.min()) < 0:
            raise CircuitKDError(
                f"dataset labels span [{int(split.labels.min())}, {hi}] but the model has {n_classes} classes"
            )
    params = list(model.parameters()) if params is None else params
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    sampler = BatchSampler(len(split), cfg.batch_size, cfg.seed)
    result = TrainResult(steps=cfg.steps)
    start = 0
    resume_path = Path(resume_dir) if resume_dir is not None else None
    if resume_path is not None and is_checkpoint(resume_path):
        state = read_checkpoint_state(resume_path)
        if state.get("train_cfg") != cfg.to_dict():
            raise CircuitKDError(
                f"resume state at {resume_path} was written by a different training config; "
                "delete it or train with the same config"
            )
        load_full_state_dict(model, state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        sampler.load(state["sampler"])
        result.losses = list(state["losses"])
        start = result.resumed_from = int(state["step"])

    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc=desc, disable=not cfg.progress, leave=False,
               initial=start, total=cfg.steps, dynamic_ncols=True)
    try:
        for step in bar:
            batch = make_batch(split, sampler.next(), device)
            loss = loss_fn(model, batch, step)
            if not torch.isfinite(loss):
                raise CircuitKDError(
                    f"loss is {loss.item()} at step {step} of {desc!r}: training diverged "
                    f"(lr={cfg.lr}); lower the learning rate or check the inputs"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            result.losses.append(float(loss.detach()))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
            done = step + 1
            if resume_path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                save_checkpoint(model, resume_path, extra_state={
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "sampler": sampler.state(),
                    "step": done, "losses": result.losses, "train_cfg": cfg.to_dict(),
                })
    finally:
        bar.close()
        model.eval()
    result.seconds = time.perf_counter() - t0
    return result
