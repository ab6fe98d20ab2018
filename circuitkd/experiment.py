"""The distillability experiment: debiased teachers, their students, and the fixes, over seeds.

Reproduces the study design of Cheng, Agarwal & Amiri (2025), "Do Students Debias Like
Teachers? On the Distillability of Bias Mitigation Methods" (arXiv 2510.26038), on one task:

* teachers trained plainly and with each debiasing method (:mod:`circuitkd.train.debias`);
* students trained alone (plainly and with each method), by Hinton KD from each teacher at
  each ``alpha`` (0 = pure KD), by debiased KD, and with each of the three fixes;
* every model evaluated on ID, OOD, worst-group and per-bias-type accuracy, for each seed.

The run folder holds ``config.json``, ``results.json`` / ``results.csv`` (one row per model
and seed, with its training budget), ``summary.md`` (mean ± std over seeds of:
distillability, i.e. what the KD student keeps of the teacher's OOD / worst-group gain over
the plain teacher; KD's contribution over the same student trained without KD; each fix's
effect), and ``models/`` (checkpoints). Models whose checkpoint and metrics already exist
are skipped, so an interrupted run resumes where it stopped. Jobs run in ``workers``
processes, each with ``threads_per_worker`` threads, in dependency order.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from circuitkd.config import EXECUTION_FIELDS, DebiasCfg, ExperimentCfg
from circuitkd.errors import CircuitKDError
from circuitkd.stats import NAN_INTERVAL, Interval, bootstrap_interval, combine, verdict

CONFIG_DIR = Path(__file__).parent / "configs"
TASKS = ("synthetic_nli", "colored_mnist", "shortcut_mnist", "mnli", "hans", "snli", "waterbirds", "celeba")
#: Tasks generated in this package (the others are loaders of real benchmarks, ``data.load_<name>``).
_GENERATED = ("synthetic_nli", "colored_mnist", "shortcut_mnist")
#: The study's arms (``circuitkd run --arm``): each a shipped config and the ``--quick`` overrides for it.
ARMS = {"nli": ("default.json", "quick.json"), "vision": ("vision.json", "vision_quick.json")}
_TEXT_LOADERS = ("mnli", "hans", "snli")


def default_config() -> ExperimentCfg:
    """The grid shipped with the package (``circuitkd/configs/default.json``)."""
    return ExperimentCfg.from_json(CONFIG_DIR / "default.json")


def quick_overrides(task: str = "synthetic_nli") -> dict[str, Any]:
    """The ``--quick`` preset: overrides applied on top of any config for a smoke run.

    Image tasks get the vision arm's (``vision_quick.json``: ViT sizes), every other task the NLI arm's.
    """
    image = task in ("colored_mnist", "shortcut_mnist", "waterbirds", "celeba")
    return json.loads((CONFIG_DIR / ARMS["vision" if image else "nli"][1]).read_text())


def arm_config_path(arm: str) -> Path:
    """The shipped config of the study's arm ``arm`` ("nli" or "vision")."""
    if arm not in ARMS:
        raise CircuitKDError(f"unknown arm {arm!r}; the study's arms are {sorted(ARMS)}")
    return CONFIG_DIR / ARMS[arm][0]


def load_config(path: Optional[str | Path] = None, *, quick: bool = False, **overrides: Any) -> ExperimentCfg:
    """A config from ``path`` (the default one when None), with the quick preset and ``overrides`` applied."""
    cfg = default_config() if path is None else ExperimentCfg.from_file(path)
    changes = {**(quick_overrides(cfg.task) if quick else {}),
               **{k: v for k, v in overrides.items() if v is not None}}
    if changes:
        data = {**cfg.to_dict(), **changes}
        if quick:
            data["name"] = f"{cfg.name}-quick"
        cfg = ExperimentCfg.from_dict(data)
    return cfg


# ------------------------------------------------------------------------------ jobs


@dataclass(frozen=True)
class Job:
    """One model of the grid: how it is made, and the jobs whose models it needs."""

    id: str
    role: str            # "teacher" or "student"
    variant: str         # teacher | alone | kd | debiased_kd | fix
    method: str          # the teacher's (or the alone student's) debiasing method
    seed: int
    alpha: Optional[float] = None
    fix: Optional[str] = None
    deps: tuple = ()
    steps: Optional[int] = None  # a budget other than the role's default (the budget sweep)


def _fmt_alpha(alpha: float) -> str:
    return f"{alpha:g}"


def plan(cfg: ExperimentCfg) -> list[Job]:
    """Every job of the grid, in an order where each job comes after the jobs it needs."""
    jobs: list[Job] = []
    methods = ("none", *cfg.methods)
    for seed in cfg.seeds:
        s = f"s{seed}"
        plain_student = f"student-alone-none-{s}"
        for m in methods:
            # confreg self-distils from a plain model of the same kind, trained first.
            confreg = m == "confreg"
            jobs.append(Job(f"teacher-{m}-{s}", "teacher", "teacher", m, seed,
                            deps=(f"teacher-none-{s}",) if confreg else ()))
            jobs.append(Job(f"student-alone-{m}-{s}", "student", "alone", m, seed,
                            deps=(plain_student,) if confreg else ()))
        for m in methods:
            teacher = f"teacher-{m}-{s}"
            for a in cfg.alphas:
                jobs.append(Job(f"student-kd{_fmt_alpha(a)}-{m}-{s}", "student", "kd", m, seed, alpha=a, deps=(teacher,)))
            if m != "none":
                deps = (teacher, plain_student) if m == "confreg" else (teacher,)
                jobs.append(Job(f"student-dkd-{m}-{s}", "student", "debiased_kd", m, seed,
                                alpha=cfg.debiased_kd_alpha, deps=deps))
                for fix in cfg.fixes:
                    jobs.append(Job(f"student-{fix}-{m}-{s}", "student", "fix", m, seed, alpha=cfg.fix_alpha,
                                    fix=fix, deps=(teacher,)))
        if cfg.controls and control_task_args(cfg) is not None:
            # Learnability and capacity controls: the same models on the task with every shortcut
            # uncorrelated with the label. A debiased teacher's findings only count if these learn.
            jobs.append(Job(f"teacher-control-{s}", "teacher", "control", "none", seed))
            jobs.append(Job(f"student-control-{s}", "student", "control", "none", seed))
        sweep = cfg.sweep_method
        for steps in cfg.student_budgets:
            if steps == cfg.student_steps:
                continue  # the grid's own KD students at this alpha are that budget's point
            for m in ("none", sweep) if sweep else ("none",):
                jobs.append(Job(f"student-kd{_fmt_alpha(cfg.budget_alpha)}-{m}-b{steps}-{s}", "student", "kd", m,
                                seed, alpha=cfg.budget_alpha, steps=steps, deps=(f"teacher-{m}-{s}",)))
    order = {j.id: i for i, j in enumerate(jobs)}
    # Teachers first (students need them), then by seed, so results arrive seed by seed.
    return sorted(jobs, key=lambda j: (j.role != "teacher", j.seed, order[j.id]))


# ------------------------------------------------------------------------ one job


@functools.lru_cache(maxsize=2)
def _task(name: str, args_json: str):
    from circuitkd import data

    if name not in TASKS:
        raise CircuitKDError(f"unknown task {name!r}; known: {list(TASKS)}")
    args = json.loads(args_json)
    if name in _TEXT_LOADERS:
        # Real benchmarks read through a pretrained tokenizer named in the config,
        # e.g. {"path_or_name": "data/mnli", "tokenizer": "bert-base-uncased", "hans": "data/hans"}.
        tok = args.pop("tokenizer", None)
        if tok is None:
            raise CircuitKDError(f"task {name!r} needs task_args.tokenizer (a pretrained name or folder)")
        args["tokenizer"] = _tokenizer(tok)
    task = getattr(data, name if name in _GENERATED else f"load_{name}")(**args)
    task.info["source"] = {"task": name, "args": json.loads(args_json)}
    return task


def _tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise CircuitKDError(f"cannot load tokenizer {name!r}: {exc}") from exc


def load_task_by_name(name: str, args: Optional[dict] = None):
    """The task ``name`` (see :data:`TASKS`) built with ``args``; cached per process."""
    return _task(name, json.dumps(args or {}, sort_keys=True))


def load_task(cfg: ExperimentCfg, *, control: bool = False):
    """The config's task; with ``control``, the same task with every shortcut uncorrelated with the label."""
    args = control_task_args(cfg) if control else cfg.task_args
    if args is None:
        raise CircuitKDError(f"task {cfg.task!r} has no shortcut strength to switch off: no control task")
    return _task(cfg.task, json.dumps(args, sort_keys=True))


#: Attention transfer (MiniLM/TinyBERT-style) on every depth-matched head, or only on the student
#: heads matched to the teacher heads of its top-16 EAP-IG shortcut circuit edges.
_ATTENTION_FIXES = {
    "attention": {"coef": 1.0, "positions": "all"},
    "attention_circuit": {"coef": 1.0, "positions": "all", "circuit": 16, "circuit_pairs": 256},
}

#: The shortcut strength at which a generated task's shortcuts carry no information about the label.
_UNCORRELATED_STRENGTH = {"synthetic_nli": 1 / 3, "colored_mnist": 0.5, "shortcut_mnist": 0.5}


def control_task_args(cfg: ExperimentCfg) -> Optional[dict]:
    """``task_args`` of the control task (None for tasks whose shortcut strength is not a setting)."""
    if cfg.task not in _UNCORRELATED_STRENGTH:
        return None
    return {**cfg.task_args, "strength": _UNCORRELATED_STRENGTH[cfg.task]}


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
    return TrainCfg(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, progress=False)


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


# --------------------------------------------------------------------------- runner


def run_experiment(cfg: ExperimentCfg, out: str | Path, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the grid into the folder ``out`` (resuming it if it exists); returns the summary dict.

    Writes ``config.json``, ``results.json``, ``results.csv`` and ``summary.md``.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    # A bad task (a shortcut strength outside [0, 1], a cue that does not fit) or a pretrained model that
    # cannot read it fails here, before the folder is touched or anything is trained.
    from circuitkd.models.build import check_spec_reads

    task = load_task(cfg)
    for role in ("teacher", "student", "assistant"):
        check_spec_reads(_spec(cfg, role), task, f"the {role}")
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    if cfg_path.exists():
        # Where the jobs run (EXECUTION_FIELDS) is not what they compute: any executor may resume a run.
        computed = lambda d: {k: v for k, v in d.items() if k not in EXECUTION_FIELDS}  # noqa: E731
        if computed(json.loads(cfg_path.read_text())) != computed(json.loads(cfg.to_json())):
            raise CircuitKDError(
                f"{out} holds a run with a different config; choose another --out folder or delete it"
            )
    cfg.to_json(cfg_path)
    jobs = plan(cfg)
    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    n = len(jobs)

    def report(row: dict) -> None:
        what = "cached" if row.get("skipped") else f"{row['seconds']:.0f}s"
        log(f"[{len(rows)}/{n}] {row['id']:<28} ood {row['ood_acc']:.3f}  worst-group "
            f"{row['worst_group_acc']:.3f}  ({what}; {time.perf_counter() - t0:.0f}s elapsed)")

    log(f"circuitkd run {cfg.name!r}: {n} models, {len(cfg.seeds)} seed(s), {_where(cfg)} -> {out}")
    if cfg.executor == "ray":
        from circuitkd.executors import run_grid

        def done(row: dict) -> None:
            rows[row["id"]] = row
            report(row)

        run_grid(cfg, jobs, out, on_done=done)
    elif cfg.workers == 1:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads_per_worker)
        try:
            for job in jobs:
                rows[job.id] = run_job(job, cfg, out)
                report(rows[job.id])
        finally:
            torch.set_num_threads(threads)
    else:
        import multiprocessing as mp

        pending = list(jobs)
        running: dict[Any, Job] = {}
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init, initargs=(cfg.threads_per_worker,)) as pool:
            while pending or running:
                for job in list(pending):
                    if len(running) >= cfg.workers:
                        break
                    if all(d in rows for d in job.deps):
                        pending.remove(job)
                        running[pool.submit(_run_in_worker, job, cfg.to_dict(), str(out))] = job
                if not running:
                    missing = sorted({d for j in pending for d in j.deps} - set(rows))
                    raise CircuitKDError(f"jobs wait on models no job makes: {missing}")
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = running.pop(fut)
                    rows[job.id] = fut.result()
                    report(rows[job.id])
    wall = time.perf_counter() - t0
    ordered = [rows[j.id] for j in jobs]
    summary = summarise(cfg, ordered)
    summary["wall_seconds"] = wall
    summary["train_seconds"] = sum(r["seconds"] for r in ordered if not r.get("skipped"))
    write_outputs(cfg, ordered, summary, out)
    log(f"done in {wall:.0f}s: {out / 'summary.md'}")
    return summary


# ------------------------------------------------------------------------- summary


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std of ``values``, ignoring None/NaN; (nan, nan) when none are left."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _pm(values: list[float], scale: float = 100.0) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{scale * mean:.1f} ± {scale * std:.1f}"


#: Verdict margins: "KD adds little" holds when debiased KD changes OOD accuracy by less than
#: EQUIVALENCE_MARGIN either way; "robustness varies by bias type" holds when the per-bias
#: changes from teacher to student spread by more than BIAS_SPREAD_MARGIN.
EQUIVALENCE_MARGIN = 0.05
BIAS_SPREAD_MARGIN = 0.10


def metric_names(rows: list[dict]) -> list[str]:
    keys = ["id_acc", "ood_acc", "worst_group_acc"]
    keys += sorted(k for k in rows[0] if k.startswith("ood_acc["))
    return keys


def _variant_label(row: dict, cfg: Optional[ExperimentCfg] = None) -> str:
    budget = ""
    if cfg is not None and row.get("steps") not in (None, cfg.teacher_steps if row["role"] == "teacher"
                                                    else cfg.student_steps):
        budget = f", {row['steps']} steps"
    if row["variant"] == "teacher":
        return "teacher"
    if row["variant"] == "control":
        return f"{row['role']} control (no shortcut)"
    if row["variant"] == "alone":
        return "student alone"
    if row["variant"] == "kd":
        return f"KD α={_fmt_alpha(row['alpha'])}{budget}"
    if row["variant"] == "debiased_kd":
        return f"debiased KD α={_fmt_alpha(row['alpha'])}"
    return f"+{row['fix']} (KD α={_fmt_alpha(row['alpha'])})"


class _Grid:
    """Rows indexed by model (variant, method, alpha, fix, steps) and seed, with per-example correctness."""

    def __init__(self, cfg: ExperimentCfg, rows: list[dict]):
        self.cfg = cfg
        self.by: dict[tuple, dict[int, dict]] = {}
        for r in rows:
            self.by.setdefault(self.key_of(r), {})[r["seed"]] = r
        self._task = None

    def key_of(self, r: dict) -> tuple:
        return self.key(r["variant"], r["method"], r["alpha"], r["fix"], r.get("steps"), r.get("role"))

    def key(self, variant: str, method: str, alpha=None, fix=None, steps: Optional[int] = None,
            role: Optional[str] = None) -> tuple:
        role = role or ("teacher" if variant == "teacher" else "student")
        default = self.cfg.teacher_steps if role == "teacher" else self.cfg.student_steps
        return (role, variant, method, alpha, fix, steps or default)

    def values(self, key: tuple, metric: str) -> list[float]:
        return [r[metric] for _, r in sorted(self.by.get(key, {}).items()) if metric in r]

    def mean(self, key: tuple, metric: str) -> float:
        return mean_std(self.values(key, metric))[0]

    def task(self):
        if self._task is None:
            self._task = load_task(self.cfg)
        return self._task

    def _mask(self, metric: str):
        """(split, example mask or None) that ``metric`` is measured on."""
        import numpy as np

        if metric == "id_acc":
            return "id_test", None
        if metric == "ood_acc":
            return "ood_test", None
        if metric.startswith("ood_acc["):
            bias = metric[len("ood_acc["):-1]
            split = self.task().ood_test
            b = split.bias_labels[bias]
            return "ood_test", ((b >= 0) & (b != split.labels)).numpy().astype(np.float64)
        return None, None

    def interval(self, terms: dict[str, tuple[tuple, str]], fn: Callable[[dict], Any]) -> Interval:
        """``fn(acc)`` with a seed x example bootstrap interval; ``terms`` maps a name to (model key, metric).

        ``acc[name]`` is ``[resample, seed]``; ``fn`` must reduce over seeds. Falls back to
        the point estimate alone where a model lacks per-example results or has no split.
        """
        import numpy as np

        seeds = sorted(set.intersection(*[set(self.by.get(k, {})) for k, _ in terms.values()]))
        if not seeds:
            return NAN_INTERVAL
        correct, masks, splits = {}, {}, set()
        for name, (k, metric) in terms.items():
            split, mask = self._mask(metric)
            rows = [self.by[k][s] for s in seeds]
            if split is None or any(split not in (r.get("correct") or {}) for r in rows):
                correct = None
                break
            splits.add(split)
            correct[name] = np.array([[c == "1" for c in r["correct"][split]] for r in rows])
            if mask is not None:
                masks[name] = mask
        if correct is None or len(splits) > 1:
            acc = {name: np.array([[self.by[k][s][metric] for s in seeds]]) for name, (k, metric) in terms.items()}
            return Interval(float(np.asarray(fn(acc))[0]), float("nan"), float("nan"), len(seeds))
        return bootstrap_interval(correct, fn, masks=masks, n_resamples=self.cfg.n_boot)


def _diff(a: str, b: str) -> Callable[[dict], Any]:
    return lambda acc: (acc[a] - acc[b]).mean(-1)


def _gain_loss(acc: dict) -> Any:
    """Teacher's OOD gain minus the student's (points lost in distillation), means over seeds."""
    return (acc["T"] - acc["T0"]).mean(-1) - (acc["S"] - acc["S0"]).mean(-1)


def _kept(acc: dict) -> Any:
    import numpy as np

    teacher_gain = (acc["T"] - acc["T0"]).mean(-1)
    student_gain = (acc["S"] - acc["S0"]).mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(teacher_gain) > 1e-9, student_gain / teacher_gain, np.nan)


def summarise(cfg: ExperimentCfg, rows: list[dict]) -> dict[str, Any]:
    """Every model and every comparison of the study, with 95% bootstrap intervals and verdicts.

    * ``models[key]``: per-seed values of each metric and their interval (``ci``);
    * ``distillability[alpha][method][metric]``: per seed, the KD student's gain over the KD
      student of the plain teacher (``student_gain``), the teacher's gain over the plain
      teacher (``teacher_gain``), ``kept`` = mean student gain / mean teacher gain, and the
      intervals ``kept_ci`` and ``loss_ci`` (teacher gain − student gain);
    * ``kd_contribution[method][metric]``: debiased KD student minus the student trained alone
      with the same method (for "none": KD at each alpha minus the plain student alone), with ``ci``;
    * ``fix_effect[fix][method][metric]``: student with the fix minus KD at ``fix_alpha``, with ``ci``;
    * ``budget``: the kept fraction and the loss at each student budget of the sweep;
    * ``targets`` / ``targets_met`` / ``banner``: whether the controls and teachers reached their targets;
    * ``findings``: the paper's findings, each with a verdict computed from the intervals.
    """
    grid = _Grid(cfg, rows)
    metrics = metric_names(rows)
    seeds = cfg.seeds
    methods = ("none", *cfg.methods)
    n_seeds = len(seeds)

    def diffs(a: tuple, b: tuple, metric: str) -> list[float]:
        xa, xb = grid.by.get(a, {}), grid.by.get(b, {})
        return [xa[s][metric] - xb[s][metric] for s in seeds if s in xa and s in xb]

    models: dict[str, dict[str, Any]] = {}
    for key, per_seed in grid.by.items():
        r = next(iter(per_seed.values()))
        label = _variant_label(r, cfg)
        entry = models.setdefault(f"{r['method']} | {label}", {
            "method": r["method"], "label": label, "variant": r["variant"],
            "values": {m: grid.values(key, m) for m in metrics}, "ci": {}})
        if r["variant"] != "control":
            for m in ("id_acc", "ood_acc"):
                entry["ci"][m] = grid.interval({"x": (key, m)}, lambda acc: acc["x"].mean(-1)).to_dict()

    findings: list[dict[str, Any]] = []
    distill: dict[str, Any] = {}
    for a in cfg.alphas:
        distill[_fmt_alpha(a)] = {}
        for m in cfg.methods:
            d = {}
            for metric in metrics:
                T, T0 = grid.key("teacher", m), grid.key("teacher", "none")
                S, S0 = grid.key("kd", m, a), grid.key("kd", "none", a)
                t_gain, s_gain = diffs(T, T0, metric), diffs(S, S0, metric)
                tm, sm = mean_std(t_gain)[0], mean_std(s_gain)[0]
                kept = sm / tm if tm and not math.isnan(tm) and abs(tm) > 1e-9 else float("nan")
                d[metric] = {"teacher_gain": t_gain, "student_gain": s_gain, "kept": kept}
                if metric == "ood_acc" or metric.startswith("ood_acc["):
                    terms = {"T": (T, metric), "T0": (T0, metric), "S": (S, metric), "S0": (S0, metric)}
                    d[metric]["kept_ci"] = grid.interval(terms, _kept).to_dict()
                    d[metric]["loss_ci"] = grid.interval(terms, _gain_loss).to_dict()
            distill[_fmt_alpha(a)][m] = d
        per_method = {m: verdict(Interval(**distill[_fmt_alpha(a)][m]["ood_acc"]["loss_ci"])) for m in cfg.methods}
        findings.append({
            "id": f"undermined_alpha{_fmt_alpha(a)}",
            "title": f"Debiasing is undermined after KD (α={_fmt_alpha(a)}{', pure KD' if a == 0 else ''})",
            "test": "teacher's OOD gain over the plain teacher − its KD student's gain over the plain teacher's "
                    "KD student > 0",
            "verdict": combine(list(per_method.values())),
            "per_method": {m: {"verdict": v, "loss": distill[_fmt_alpha(a)][m]["ood_acc"]["loss_ci"],
                               "kept": distill[_fmt_alpha(a)][m]["ood_acc"]["kept_ci"]}
                           for m, v in per_method.items()}})

    contribution: dict[str, Any] = {}
    for m in cfg.methods:
        A, B = grid.key("debiased_kd", m, cfg.debiased_kd_alpha), grid.key("alone", m)
        contribution[m] = {metric: diffs(A, B, metric) for metric in metrics}
        contribution[m]["ci"] = {"ood_acc": grid.interval({"a": (A, "ood_acc"), "b": (B, "ood_acc")},
                                                          _diff("a", "b")).to_dict()}
        contribution[m]["_vs"] = "debiased KD − student alone with the same method"
    for a in cfg.alphas:
        A, B = grid.key("kd", "none", a), grid.key("alone", "none")
        entry = {metric: diffs(A, B, metric) for metric in metrics}
        entry["ci"] = {"ood_acc": grid.interval({"a": (A, "ood_acc"), "b": (B, "ood_acc")}, _diff("a", "b")).to_dict()}
        contribution[f"none (KD α={_fmt_alpha(a)})"] = entry
    if cfg.methods:
        per_method = {m: verdict(Interval(**contribution[m]["ci"]["ood_acc"]), equivalence=EQUIVALENCE_MARGIN)
                      for m in cfg.methods}
        findings.append({
            "id": "kd_adds_little", "title": "KD adds little to a debiased student",
            "test": f"debiased KD − the same student trained alone with the method, OOD: interval inside "
                    f"±{100 * EQUIVALENCE_MARGIN:.0f} points",
            "verdict": combine(list(per_method.values())),
            "per_method": {m: {"verdict": v, "effect": contribution[m]["ci"]["ood_acc"]} for m, v in per_method.items()}})

    biases = [k[len("ood_acc["):-1] for k in metrics if k.startswith("ood_acc[")]
    if len(biases) > 1 and cfg.methods:
        import numpy as np

        alpha = cfg.fix_alpha if cfg.fix_alpha in cfg.alphas else cfg.alphas[0]
        per_method = {}
        for m in cfg.methods:
            T, S = grid.key("teacher", m), grid.key("kd", m, alpha)
            terms = {**{f"T|{b}": (T, f"ood_acc[{b}]") for b in biases},
                     **{f"S|{b}": (S, f"ood_acc[{b}]") for b in biases}}

            def spread(acc, biases=biases):
                change = np.stack([(acc[f"S|{b}"] - acc[f"T|{b}"]).mean(-1) for b in biases])
                return change.max(0) - change.min(0)

            iv = grid.interval(terms, spread)
            changes = {b: mean_std(diffs(S, T, f"ood_acc[{b}]"))[0] for b in biases}
            per_method[m] = {"verdict": verdict(iv, above=BIAS_SPREAD_MARGIN), "spread": iv.to_dict(),
                             "change_by_bias": changes}
        findings.append({
            "id": "varies_by_bias", "title": "Robustness varies a lot by bias type",
            "test": f"spread (max − min over bias types) of the teacher→KD-student change in conflicting-example "
                    f"accuracy at α={_fmt_alpha(alpha)} > {100 * BIAS_SPREAD_MARGIN:.0f} points",
            "verdict": combine([d["verdict"] for d in per_method.values()]), "per_method": per_method})

    fixes: dict[str, Any] = {}
    for fix in cfg.fixes:
        fixes[fix] = {}
        for m in cfg.methods:
            A, B = grid.key("fix", m, cfg.fix_alpha, fix), grid.key("kd", m, cfg.fix_alpha)
            fixes[fix][m] = {metric: diffs(A, B, metric) for metric in metrics}
            fixes[fix][m]["ci"] = {"ood_acc": grid.interval({"a": (A, "ood_acc"), "b": (B, "ood_acc")},
                                                            _diff("a", "b")).to_dict()}
            T, T0, S0 = grid.key("teacher", m), grid.key("teacher", "none"), grid.key("kd", "none", cfg.fix_alpha)
            fixes[fix][m]["kept_ci"] = grid.interval({"T": (T, "ood_acc"), "T0": (T0, "ood_acc"), "S": (A, "ood_acc"),
                                                      "S0": (S0, "ood_acc")}, _kept).to_dict()
        per_method = {m: verdict(Interval(**fixes[fix][m]["ci"]["ood_acc"])) for m in cfg.methods}
        findings.append({
            "id": f"fix_{fix}", "title": f"The {fix} fix helps",
            "test": f"student with the fix − KD at α={_fmt_alpha(cfg.fix_alpha)} from the same teacher, OOD > 0",
            "verdict": combine(list(per_method.values())),
            "per_method": {m: {"verdict": v, "effect": fixes[fix][m]["ci"]["ood_acc"],
                               "kept": fixes[fix][m]["kept_ci"]} for m, v in per_method.items()}})

    budget = _budget_sweep(cfg, grid)
    targets = _targets(cfg, grid)
    banner = [t["message"] for t in targets if not t["ok"]]
    if n_seeds < 2:
        banner.append(f"only {n_seeds} seed: every verdict is inconclusive (1 seed); run two or more")
    return {"metrics": metrics, "models": models, "distillability": distill, "kd_contribution": contribution,
            "fix_effect": fixes, "budget": budget, "targets": targets,
            "targets_met": all(t["ok"] for t in targets), "banner": banner, "findings": findings,
            "methods": list(methods), "n_seeds": n_seeds}


def _budget_sweep(cfg: ExperimentCfg, grid: _Grid) -> dict[str, Any]:
    """Kept fraction and OOD loss of the sweep method's KD student at each student budget."""
    m = cfg.sweep_method
    if not m or not cfg.student_budgets:
        return {}
    out: dict[str, Any] = {"method": m, "alpha": cfg.budget_alpha, "points": []}
    T, T0 = grid.key("teacher", m), grid.key("teacher", "none")
    for steps in sorted({*cfg.student_budgets, cfg.student_steps}):
        S, S0 = grid.key("kd", m, cfg.budget_alpha, steps=steps), grid.key("kd", "none", cfg.budget_alpha, steps=steps)
        if S not in grid.by or S0 not in grid.by:
            continue
        terms = {"T": (T, "ood_acc"), "T0": (T0, "ood_acc"), "S": (S, "ood_acc"), "S0": (S0, "ood_acc")}
        loss = grid.interval(terms, _gain_loss)
        out["points"].append({
            "steps": steps, "kept": grid.interval(terms, _kept).to_dict(), "loss": loss.to_dict(),
            "student_ood": grid.mean(S, "ood_acc"), "plain_student_ood": grid.mean(S0, "ood_acc"),
            "student_id": grid.mean(S, "id_acc"), "undermined": verdict(loss)})
    return out


def _targets(cfg: ExperimentCfg, grid: _Grid) -> list[dict[str, Any]]:
    """Each accuracy target of :data:`circuitkd.config.DEFAULT_TARGETS` against this run's means over seeds."""
    out: list[dict[str, Any]] = []

    def check(name: str, what: str, value: float, target: float, at_most: bool = False) -> None:
        ok = (value <= target) if at_most else (value >= target)
        ok = ok and not math.isnan(value)
        sign = "≤" if at_most else "≥"
        message = (f"{what} {value:.2f} {'>' if at_most else '<'} {target:.2f}: findings below are unreliable"
                   if not ok else f"{what} {value:.2f} {sign} {target:.2f}")
        out.append({"name": name, "what": what, "value": value, "target": target, "at_most": at_most, "ok": ok,
                    "message": message})

    if cfg.controls and control_task_args(cfg) is not None:
        for role in ("teacher", "student"):
            key = grid.key("control", "none", role=role)
            for split in ("id", "ood"):
                check(f"control_{role}_{split}", f"{role} control (no shortcut) {split.upper()}",
                      grid.mean(key, f"{split}_acc"), cfg.target(f"control_{role}_{split}"))
    plain = grid.key("teacher", "none")
    plain_ood = grid.mean(plain, "ood_acc")
    check("plain_teacher_id", "plain teacher ID", grid.mean(plain, "id_acc"), cfg.target("plain_teacher_id"))
    check("plain_teacher_ood_max", "plain teacher OOD", plain_ood, cfg.target("plain_teacher_ood_max"), at_most=True)
    if cfg.methods:
        good = [m for m in cfg.methods
                if grid.mean(grid.key("teacher", m), "id_acc") >= cfg.target("debiased_teacher_id")
                and grid.mean(grid.key("teacher", m), "ood_acc") >= plain_ood + cfg.target("debiased_teacher_ood_gain")]
        need = min(2, len(cfg.methods))
        ok = len(good) >= need
        out.append({"name": "debiased_teachers", "what": "debiased teachers", "value": len(good), "target": need,
                    "at_most": False, "ok": ok, "methods": good,
                    "message": (f"{len(good)} of {len(cfg.methods)} debiased teachers reach ID ≥ "
                                f"{cfg.target('debiased_teacher_id'):.2f} and OOD ≥ plain + "
                                f"{cfg.target('debiased_teacher_ood_gain'):.2f} ({', '.join(good) or 'none'}); "
                                f"need {need}" + ("" if ok else ": findings below are unreliable"))})
    return out


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _short(metric: str) -> str:
    return {"id_acc": "ID", "ood_acc": "OOD", "worst_group_acc": "worst group"}.get(
        metric, metric.replace("ood_acc[", "OOD ").rstrip("]"))


def _ci(d: Optional[dict], scale: float = 100.0, digits: int = 1) -> str:
    return "–" if not d else Interval(**d).fmt(scale, digits)


def render_summary(cfg: ExperimentCfg, summary: dict[str, Any]) -> str:
    """The markdown report: banner, verdicts, every model, distillability, KD contribution, fixes, budget."""
    metrics = summary["metrics"]
    t_spec, s_spec = cfg.model_spec("teacher"), cfg.model_spec("student")
    out = [f"# circuitkd run `{cfg.name}`", ""]
    for line in summary.get("banner", []):
        out += [f"**⚠ {line}**", ""]
    out.append(
        f"Task `{cfg.task}` {cfg.task_args or ''}; teacher {t_spec.n_layers}L d={t_spec.d_model}, student "
        f"{s_spec.n_layers}L d={s_spec.d_model}; budget: teachers {cfg.teacher_steps} steps, students "
        f"{cfg.student_steps} steps, batch {cfg.batch_size}, lr {cfg.lr}; KD temperature {cfg.temperature}; "
        f"seeds {list(cfg.seeds)}. Accuracies in %; mean ± std over seeds, and 95% intervals [lo, hi] from a "
        f"bootstrap over seeds and test examples ({cfg.n_boot} resamples).")
    if "wall_seconds" in summary:
        out.append(f"\nWall time: {summary['wall_seconds']:.0f} s ({summary['wall_seconds'] / 60:.1f} min) with "
                   f"{_where(cfg)}; summed training time {summary.get('train_seconds', 0):.0f} s.")
    if summary.get("targets"):
        out += ["", "## Targets", "", "Controls train the same models on the task with every shortcut uncorrelated "
                "with the label. Means over seeds.", ""]
        out.append(_table(["target", "value", "met"], [
            [t["what"] if t["name"] == "debiased_teachers" else f"{t['what']} {'≤' if t['at_most'] else '≥'} "
             f"{t['target']:.2f}", t["message"] if t["name"] == "debiased_teachers" else f"{t['value']:.3f}",
             "yes" if t["ok"] else "**no**"] for t in summary["targets"]]))
    if summary.get("findings"):
        out += ["", "## Findings (verdicts computed from the intervals)", ""]
        body = []
        for f in summary["findings"]:
            detail = "; ".join(finding_detail(name, d) for name, d in f.get("per_method", {}).items())
            body.append([f["title"], f"**{f['verdict']}**", f["test"], detail])
        out.append(_table(["finding", "verdict", "test", "per method"], body))
    out += ["", "## Every model", ""]
    body = [[v["method"], v["label"], *[_pm(v["values"][m]) for m in metrics],
             _ci(v["ci"].get("ood_acc"))] for v in summary["models"].values()]
    out.append(_table(["method", "model", *map(_short, metrics), "OOD 95% interval"], body))

    out += ["", "## Distillability", "",
            "Gain over the plain model, in points: the teacher's (debiased teacher − plain teacher) and the "
            "KD student's (student of the debiased teacher − student of the plain teacher, same α). "
            "*kept* = student gain / teacher gain (1 = fully distilled; unstable when the teacher gains little); "
            "*lost* = teacher gain − student gain.", ""]
    for a, per_method in summary["distillability"].items():
        out += [f"### KD α={a}" + (" (pure KD)" if float(a) == 0 else ""), ""]
        body = []
        for m, d in per_method.items():
            for metric in metrics[1:]:
                e = d[metric]
                kept = "–" if math.isnan(e["kept"]) else f"{e['kept']:.2f}"
                body.append([m, _short(metric), _pm(e["teacher_gain"]), _pm(e["student_gain"]), kept,
                             _ci(e.get("kept_ci"), 1.0, 2), _ci(e.get("loss_ci"))])
        out.append(_table(["method", "metric", "teacher gain", "student gain", "kept", "kept 95% interval",
                           "lost, 95% interval"], body))
        out.append("")

    out += ["## KD contribution", "",
            "Debiased KD student − the same student trained alone with the same method; for `none`, the plain "
            "KD student − the plain student alone. Points.", ""]
    body = [[m, *[_pm(d[metric]) for metric in metrics], _ci(d.get("ci", {}).get("ood_acc"))]
            for m, d in summary["kd_contribution"].items()]
    out.append(_table(["method", *map(_short, metrics), "OOD 95% interval"], body))

    out += ["", f"## Fixes (vs KD at α={_fmt_alpha(cfg.fix_alpha)} from the same teacher)", "",
            "Points gained by each fix over plain KD from the same debiased teacher, and the fraction of the "
            "teacher's OOD gain the fixed student keeps.", ""]
    body = [[fix, m, *[_pm(d[metric]) for metric in metrics], _ci(d.get("ci", {}).get("ood_acc")),
             _ci(d.get("kept_ci"), 1.0, 2)]
            for fix, per_method in summary["fix_effect"].items() for m, d in per_method.items()]
    out.append(_table(["fix", "method", *map(_short, metrics), "OOD 95% interval", "kept 95% interval"], body))
    sweep = summary.get("budget") or {}
    if sweep.get("points"):
        out += ["", f"## Student budget sweep (KD α={_fmt_alpha(sweep['alpha'])} from the `{sweep['method']}` "
                f"and the plain teacher)", "",
                "Whether the student loses its teacher's debiasing depends on how far its training converged.", ""]
        out.append(_table(["student steps", "student ID", "student OOD", "plain teacher's student OOD", "kept",
                           "lost (points)", "undermined"],
                          [[str(p["steps"]), f"{100 * p['student_id']:.1f}", f"{100 * p['student_ood']:.1f}",
                            f"{100 * p['plain_student_ood']:.1f}", _ci(p["kept"], 1.0, 2), _ci(p["loss"]),
                            p["undermined"]] for p in sweep["points"]]))
    out.append("")
    return "\n".join(out)


def finding_detail(method: str, d: dict) -> str:
    """One method's verdict with the interval(s) behind it, for tables and the report."""
    if "sensitivity_diff" in d:
        return (f"{method} {d['verdict']} (sensitivity Δ {_ci(d['sensitivity_diff'], 1.0, 2)}, shortcut attention Δ "
                f"{_ci(d['attention_diff'], 1.0, 3)}, teacher edges kept {_ci(d['edge_survival'], 1.0, 2)})")
    for key in ("loss", "effect", "spread"):
        if key in d:
            text = f"{method} {d['verdict']} ({key} {_ci(d[key])}"
            if "kept" in d:
                text += f", kept {_ci(d['kept'], 1.0, 2)}"
            return text + ")"
    return f"{method} {d['verdict']}"


def add_mechanism_finding(run_dir: str | Path, finding: dict[str, Any]) -> None:
    """Put the analysis stage's mechanism verdict beside the other findings in ``results.json`` and ``summary.md``."""
    from circuitkd.models.checkpoint import atomic_write_text

    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    summary = results["summary"]
    summary["findings"] = [f for f in summary.get("findings", []) if f.get("id") != finding["id"]] + [finding]
    cfg = ExperimentCfg.from_dict(results["config"])
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2, default=str))
    atomic_write_text(run_dir / "summary.md", render_summary(cfg, summary))


def write_outputs(cfg: ExperimentCfg, rows: list[dict], summary: dict[str, Any], out: Path) -> None:
    from circuitkd.models.checkpoint import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(
        {"config": cfg.to_dict(), "results": [{k: v for k, v in r.items() if k != "skipped"} for r in rows],
         "summary": summary}, indent=2, default=str))
    cols = ["id", "role", "variant", "method", "seed", "alpha", "fix", "temperature", "steps", "batch_size", "lr",
            "n_layers", "d_model", "seconds", *summary["metrics"]]
    cols += sorted({k for r in rows for k in r if k.startswith("conflicting_acc[")})
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "summary.md", render_summary(cfg, summary))
