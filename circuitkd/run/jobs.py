"""One job of the grid: build its task and spec, train or distil its model (resuming a partial
checkpoint), evaluate it and write its row; and the worker set-up of the local process pool."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from circuitkd.config import DebiasCfg, ExperimentCfg
from circuitkd.run.plan import Job
from circuitkd.run.tasks import load_task


#: Attention transfer (MiniLM/TinyBERT-style) on every depth-matched head, or only on the student
#: heads matched to the teacher heads of its top-16 EAP-IG shortcut circuit edges.
_ATTENTION_FIXES = {
    "attention": {"coef": 1.0, "positions": "all"},
    "attention_circuit": {"coef": 1.0, "positions": "all", "circuit": 16, "circuit_pairs": 256},
}

def _device(cfg: ExperimentCfg):
    from circuitkd.models.build import default_device

    return default_device() if cfg.device == "auto" else cfg.device


def _spec(cfg: ExperimentCfg, role: str):
    spec = cfg.model_spec(role)
    task = load_task(cfg)
    if task.modality == "image" and spec.backbone != "vit":
        # The presets are text encoders; an image task uses ViTs of the same depth and width.
        spec = spec.replace(backbone="vit")
    return spec


def _train_cfg(cfg: ExperimentCfg, role: str, seed: int, steps: Optional[int] = None):
    from circuitkd.config import TrainCfg

    steps = steps or (cfg.teacher_steps if role == "teacher" else cfg.student_steps)
    return TrainCfg(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed,
                    progress=False)


def _summarise_scores(scores: dict) -> dict[str, Any]:
    out = {k: scores[k] for k in ("id_acc", "ood_acc", "worst_group_acc", "fine_worst_group_acc")}
    for bias, d in scores["per_bias"].items():
        out[f"ood_acc[{bias}]"] = d["ood_acc"]
        out[f"conflicting_acc[{bias}]"] = d["conflicting_acc"]
        out[f"worst_group_acc[{bias}]"] = d["worst_group_acc"]
    return out


def _bits(correct) -> str:
    """Per-example correctness as a compact string of 0/1 (what the bootstrap resamples)."""
    return "".join("1" if c else "0" for c in correct.tolist())


def _where(cfg: ExperimentCfg) -> str:
    if cfg.executor == "ray":
        return f"Ray tasks of {cfg.cpus_per_job} CPU(s) and {cfg.gpus_per_job:g} GPU(s)"
    return f"{cfg.workers} worker(s)"


def finished_row(job: Job, run_dir: str | Path) -> Optional[dict[str, Any]]:
    """``job``'s result row (marked ``skipped``) when its checkpoint and metrics exist, else None."""
    from circuitkd.models.checkpoint import is_checkpoint

    metrics_path = Path(run_dir) / "metrics" / f"{job.id}.json"
    if metrics_path.exists() and is_checkpoint(Path(run_dir) / "models" / job.id):
        return {**json.loads(metrics_path.read_text()), "skipped": True}
    return None


def run_job(job: Job, cfg: ExperimentCfg, run_dir: str | Path) -> dict[str, Any]:
    """Train (or load) ``job``'s model, evaluate it, and write its metrics; returns its result row."""
    import torch

    from circuitkd.evaluate import evaluate
    from circuitkd.models.checkpoint import atomic_write_text, load_checkpoint
    from circuitkd.train.distill import distill
    from circuitkd.train.train import train_model

    run_dir = Path(run_dir)
    ckpt = run_dir / "models" / job.id
    metrics_path = run_dir / "metrics" / f"{job.id}.json"
    done = finished_row(job, run_dir)
    if done is not None:
        return done
    torch.manual_seed(job.seed)
    task = load_task(cfg, control=job.variant == "control")
    device = _device(cfg)
    options = DebiasCfg.from_dict(cfg.debias)
    load = lambda dep: load_checkpoint(run_dir / "models" / dep, device=device)  # noqa: E731
    t0 = time.perf_counter()
    train_cfg = _train_cfg(cfg, job.role, job.seed, job.steps)
    debias_options = {"options": options}
    if job.method == "confreg" and job.variant in ("teacher", "alone", "debiased_kd"):
        plain = f"teacher-none-s{job.seed}" if job.role == "teacher" else f"student-alone-none-s{job.seed}"
        debias_options["teacher"] = load(plain)
    if job.variant in ("teacher", "alone", "control"):
        model = train_model(_spec(cfg, job.role), task, debias=job.method, seed=job.seed, cfg=train_cfg,
                            device=device, checkpoint=ckpt, desc=job.id,
                            debias_options=None if job.method == "none" else debias_options)
    else:
        teacher = load(f"teacher-{job.method}-s{job.seed}")
        kwargs: dict[str, Any] = {}
        if job.variant == "debiased_kd":
            kwargs = {"debias": job.method, "debias_options": debias_options}
        elif job.fix == "augment":
            kwargs = {"augment": cfg.augment_n}
        elif job.fix == "iterative":
            kwargs = {"via": [_spec(cfg, "assistant")]}
        elif job.fix == "init":
            kwargs = {"init_from_teacher": True}
        elif job.fix in _ATTENTION_FIXES:
            kwargs = {"attention_transfer": _ATTENTION_FIXES[job.fix]}
        model = distill(teacher, _spec(cfg, "student"), task, temperature=cfg.temperature, alpha=job.alpha,
                        seed=job.seed, cfg=train_cfg, device=device, checkpoint=ckpt, desc=job.id, **kwargs)
    scores = evaluate(model, task, per_example=True)
    correct = {split: _bits(c) for split, c in scores.pop("correct").items()}
    from circuitkd.models.build import spec_of

    spec = spec_of(model)  # the sizes built (a pretrained model's own), not the config's defaults
    row = {
        "id": job.id, "role": job.role, "variant": job.variant, "method": job.method, "seed": job.seed,
        "alpha": job.alpha, "fix": job.fix, "temperature": None if job.role == "teacher" or job.variant in ("alone", "control")
        else cfg.temperature,
        "steps": train_cfg.steps, "batch_size": train_cfg.batch_size, "lr": train_cfg.lr,
        "n_layers": spec.n_layers, "d_model": spec.d_model,
        "seconds": round(time.perf_counter() - t0, 2), **_summarise_scores(scores), "scores": scores,
        "correct": correct, "sweep": job.steps is not None,
    }
    atomic_write_text(metrics_path, json.dumps(row, indent=2, default=str))
    return row


def _worker_init(threads: int) -> None:
    import multiprocessing
    import os
    import threading

    # A worker dies with its driver: when the driver is SIGKILLed the worker is re-parented,
    # and this watchdog ends it instead of leaving it to finish writing into the run folder.
    # The driver's pid comes from multiprocessing (not getppid()), so a driver that died
    # before this ran is noticed too.
    driver = multiprocessing.parent_process()
    parent = driver.pid if driver is not None else os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="circuitkd-orphan-watchdog", daemon=True).start()
    import torch

    torch.set_num_threads(threads)


def _run_in_worker(job: Job, cfg_dict: dict, run_dir: str) -> dict[str, Any]:
    return run_job(job, ExperimentCfg.from_dict(cfg_dict), run_dir)

