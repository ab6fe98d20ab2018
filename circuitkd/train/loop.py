"""The training loop for circuitkd bridges: AdamW, linear warm-up then linear decay.

Batches are drawn from a seeded generator and the loop runs under its own seeded torch RNG
(dropout), so a run is deterministic on CPU, and the loop can resume from its last
checkpoint after an interruption, bit for bit: the checkpoint holds the weights, the
optimiser, schedule, sampler and RNG states, parameters the loss trains outside the model
(learned-mixin's gate) and the loss's own state (see :func:`loss_states`: a debiasing
method's per-example tables and Group DRO's weights). A non-finite loss stops it with a
clear error.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1), the loop trains data-parallel with PyTorch's
``DistributedDataParallel`` (gloo on CPU, NCCL on GPUs): every rank draws the same global
batch from the seeded sampler and takes an equal contiguous shard of it, and DDP averages
the gradients, so for losses that are means over examples (cross-entropy, KD, PoE, focal,
JTT) a run on N processes takes the same steps as a run on one. Only rank 0 writes
checkpoints.
"""
from __future__ import annotations

import os
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


def loss_states(loss_fn: LossFn) -> list[Any]:
    """The parts of ``loss_fn`` that carry training state, in a fixed order.

    A loss carries state when it has ``state_dict()``, ``load_state_dict(state)`` and
    ``prepare()`` (e.g. :class:`circuitkd.train.debias.Objective`); a loss that wraps others
    (the KD loss wraps a debiasing label loss) lists them in ``loss_fn.wraps``.
    """
    found = [loss_fn] if callable(getattr(loss_fn, "state_dict", None)) else []
    for inner in getattr(loss_fn, "wraps", ()):
        found += loss_states(inner)
    return found


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


def init_distributed() -> tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` unless launched by ``torchrun``, whose process group it joins.

    The backend is NCCL when CUDA is available (each rank on GPU ``LOCAL_RANK``), else gloo.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """True on rank 0 of a ``torchrun`` job, and in every single-process run."""
    return init_distributed()[0] == 0


def _ddp_class():
    from torch.nn.parallel import DistributedDataParallel

    class _DDP(DistributedDataParallel):
        # Losses read the bridge's attributes (its spec, its unembed for learned-mixin): forward them.
        def __getattr__(self, name: str):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    return _DDP


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
            pass extra ones (e.g. a learned-mixin gate) here. Those outside the model are saved
            with the resumable state, as is the state of every part of ``loss_fn`` that
            :func:`loss_states` finds.
    """
    device = model_device(model)
    n_classes = spec_of(model).n_classes
    if n_classes is not None and len(split):
        hi = int(split.labels.max())
        if hi >= n_classes or int(split.labels.min()) < 0:
            raise CircuitKDError(
                f"dataset labels span [{int(split.labels.min())}, {hi}] but the model has {n_classes} classes"
            )
    params = list(model.parameters()) if params is None else params
    own = {id(p) for p in model.parameters()}
    extra_params = [p for p in params if id(p) not in own]
    stateful = loss_states(loss_fn)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # The loop's own RNG (dropout), seeded from the config and saved with each checkpoint.
        torch.default_generator.manual_seed(cfg.seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(cfg.seed)
        return _train(model, split, cfg, loss_fn, resume_dir, desc, params, extra_params, stateful, device)


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _resume(path: Path, cfg: TrainCfg, model, opt, sched, sampler: BatchSampler,
            extra_params: list[torch.nn.Parameter], stateful: list[Any], device: torch.device) -> dict[str, Any]:
    """Load the partial checkpoint at ``path`` into everything the loop trains with; returns it."""
    state = read_checkpoint_state(path)
    if state.get("train_cfg") != cfg.to_dict():
        raise CircuitKDError(
            f"resume state at {path} was written by a different training config; "
            "delete it or train with the same config"
        )
    saved_extra = state.get("extra_params", [])
    saved_loss = state.get("loss_state", [])
    if len(saved_extra) != len(extra_params) or any(a.shape != b.shape for a, b in zip(saved_extra, extra_params)):
        raise CircuitKDError(
            f"resume state at {path} holds {len(saved_extra)} parameters outside the model but this run trains "
            f"{len(extra_params)} (another debiasing method wrote it); delete it or train with the same method"
        )
    if len(saved_loss) != len(stateful):
        raise CircuitKDError(
            f"resume state at {path} holds the state of {len(saved_loss)} stateful losses but this run's loss has "
            f"{len(stateful)} (another debiasing method wrote it); delete it or train with the same method"
        )
    load_full_state_dict(model, state["model"])
    with torch.no_grad():
        for p, saved in zip(extra_params, saved_extra):
            p.copy_(saved)
    for part, saved in zip(stateful, saved_loss):
        try:
            part.load_state_dict(saved)
        except CircuitKDError as exc:
            raise CircuitKDError(f"resume state at {path}: {exc}; delete it or train with the same method") from None
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    sampler.load(state["sampler"])
    if "rng" in state:
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    return state


def _train(model, split: Split, cfg: TrainCfg, loss_fn: LossFn, resume_dir, desc: str,
           params: list[torch.nn.Parameter], extra_params: list[torch.nn.Parameter], stateful: list[Any],
           device: torch.device) -> TrainResult:
    import time

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    sampler = BatchSampler(len(split), cfg.batch_size, cfg.seed)
    result = TrainResult(steps=cfg.steps)
    start = 0
    resume_path = Path(resume_dir) if resume_dir is not None else None
    if resume_path is not None and is_checkpoint(resume_path):
        state = _resume(resume_path, cfg, model, opt, sched, sampler, extra_params, stateful, device)
        result.losses = list(state["losses"])
        start = result.resumed_from = int(state["step"])
    else:
        for part in stateful:
            part.prepare()

    rank, world = init_distributed()
    forward_model = model
    if world > 1:
        import torch.distributed as dist

        if cfg.batch_size % world:
            raise CircuitKDError(
                f"batch_size={cfg.batch_size} does not split evenly over {world} processes; "
                f"use a multiple of {world}"
            )
        forward_model = _ddp_class()(model, device_ids=[device.index] if device.type == "cuda" else None,
                                     find_unused_parameters=True)

    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc=desc, disable=not cfg.progress, leave=False,
               initial=start, total=cfg.steps, dynamic_ncols=True)
    try:
        for step in bar:
            idx = sampler.next()
            if world > 1:
                idx = idx.chunk(world)[rank]
            batch = make_batch(split, idx, device)
            loss = loss_fn(forward_model, batch, step)
            logged = loss.detach().clone()
            if world > 1:
                dist.all_reduce(logged)
                logged /= world
            if not torch.isfinite(logged):
                raise CircuitKDError(
                    f"loss is {logged.item()} at step {step} of {desc!r}: training diverged "
                    f"(lr={cfg.lr}); lower the learning rate or check the inputs"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in extra_params if world > 1 else ():
                # Parameters outside the model (a learned-mixin gate) are not DDP's: average them here.
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            result.losses.append(float(logged))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
            done = step + 1
            if (resume_path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0
                    and done < cfg.steps and rank == 0):
                save_checkpoint(model, resume_path, extra_state={
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "sampler": sampler.state(),
                    "step": done, "losses": result.losses, "train_cfg": cfg.to_dict(),
                    "extra_params": [p.detach().cpu().clone() for p in extra_params],
                    "loss_state": [part.state_dict() for part in stateful], "rng": _rng_state(device),
                })
    finally:
        bar.close()
        model.eval()
    result.seconds = time.perf_counter() - t0
    return result
