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

from circuitkd.config import DebiasCfg, ExperimentCfg
from circuitkd.errors import CircuitKDError

CONFIG_DIR = Path(__file__).parent / "configs"
TASKS = ("synthetic_nli", "colored_mnist", "mnli", "hans", "snli", "waterbirds", "celeba")
_TEXT_LOADERS = ("mnli", "hans", "snli")


def default_config() -> ExperimentCfg:
    """The grid shipped with the package (``circuitkd/configs/default.json``)."""
    return ExperimentCfg.from_json(CONFIG_DIR / "default.json")


def quick_overrides() -> dict[str, Any]:
    """The ``--quick`` preset: overrides applied on top of any config for a smoke run."""
    return json.loads((CONFIG_DIR / "quick.json").read_text())


def load_config(path: Optional[str | Path] = None, *, quick: bool = False, **overrides: Any) -> ExperimentCfg:
    """A config from ``path`` (the default one when None), with the quick preset and ``overrides`` applied."""
    cfg = default_config() if path is None else ExperimentCfg.from_file(path)
    changes = {**(quick_overrides() if quick else {}), **{k: v for k, v in overrides.items() if v is not None}}
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
    task = getattr(data, f"load_{name}" if name in TASKS[2:] else name)(**args)
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


def load_task(cfg: ExperimentCfg):
    return _task(cfg.task, json.dumps(cfg.task_args, sort_keys=True))


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


def _train_cfg(cfg: ExperimentCfg, role: str, seed: int):
    from circuitkd.config import TrainCfg

    steps = cfg.teacher_steps if role == "teacher" else cfg.student_steps
    return TrainCfg(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, progress=False)


def _summarise_scores(scores: dict) -> dict[str, Any]:
    out = {k: scores[k] for k in ("id_acc", "ood_acc", "worst_group_acc")}
    for bias, d in scores["per_bias"].items():
        out[f"ood_acc[{bias}]"] = d["ood_acc"]
        out[f"conflicting_acc[{bias}]"] = d["conflicting_acc"]
    return out


def run_job(job: Job, cfg: ExperimentCfg, run_dir: str | Path) -> dict[str, Any]:
    """Train (or load) ``job``'s model, evaluate it, and write its metrics; returns its result row."""
    import torch

    from circuitkd.evaluate import evaluate
    from circuitkd.models.checkpoint import atomic_write_text, is_checkpoint, load_checkpoint
    from circuitkd.train.distill import distill
    from circuitkd.train.train import train_model

    run_dir = Path(run_dir)
    ckpt = run_dir / "models" / job.id
    metrics_path = run_dir / "metrics" / f"{job.id}.json"
    if metrics_path.exists() and is_checkpoint(ckpt):
        row = json.loads(metrics_path.read_text())
        row["skipped"] = True
        return row
    torch.manual_seed(job.seed)
    task = load_task(cfg)
    device = _device(cfg)
    options = DebiasCfg.from_dict(cfg.debias)
    load = lambda dep: load_checkpoint(run_dir / "models" / dep, device=device)  # noqa: E731
    t0 = time.perf_counter()
    train_cfg = _train_cfg(cfg, job.role, job.seed)
    debias_options = {"options": options}
    if job.method == "confreg" and job.variant in ("teacher", "alone", "debiased_kd"):
        plain = f"teacher-none-s{job.seed}" if job.role == "teacher" else f"student-alone-none-s{job.seed}"
        debias_options["teacher"] = load(plain)
    if job.variant in ("teacher", "alone"):
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
        model = distill(teacher, _spec(cfg, "student"), task, temperature=cfg.temperature, alpha=job.alpha,
                        seed=job.seed, cfg=train_cfg, device=device, checkpoint=ckpt, desc=job.id, **kwargs)
    scores = evaluate(model, task)
    spec = _spec(cfg, job.role)
    row = {
        "id": job.id, "role": job.role, "variant": job.variant, "method": job.method, "seed": job.seed,
        "alpha": job.alpha, "fix": job.fix, "temperature": None if job.role == "teacher" or job.variant == "alone"
        else cfg.temperature,
        "steps": train_cfg.steps, "batch_size": train_cfg.batch_size, "lr": train_cfg.lr,
        "n_layers": spec.n_layers, "d_model": spec.d_model,
        "seconds": round(time.perf_counter() - t0, 2), **_summarise_scores(scores), "scores": scores,
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
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old != json.loads(cfg.to_json()):
            raise CircuitKDError(
                f"{out} holds a run with a different config; choose another --out folder or delete it"
            )
    cfg.to_json(cfg_path)
    jobs = plan(cfg)
    load_task(cfg)  # fail early on a bad task, before any process starts
    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    n = len(jobs)

    def report(row: dict) -> None:
        what = "cached" if row.get("skipped") else f"{row['seconds']:.0f}s"
        log(f"[{len(rows)}/{n}] {row['id']:<28} ood {row['ood_acc']:.3f}  worst-group "
            f"{row['worst_group_acc']:.3f}  ({what}; {time.perf_counter() - t0:.0f}s elapsed)")

    log(f"circuitkd run {cfg.name!r}: {n} models, {len(cfg.seeds)} seed(s), {cfg.workers} worker(s) -> {out}")
    if cfg.workers == 1:
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


def metric_names(rows: list[dict]) -> list[str]:
    keys = ["id_acc", "ood_acc", "worst_group_acc"]
    keys += sorted(k for k in rows[0] if k.startswith("ood_acc["))
    return keys


def _variant_label(row: dict) -> str:
    if row["variant"] == "teacher":
        return "teacher"
    if row["variant"] == "alone":
        return "student alone"
    if row["variant"] == "kd":
        return f"KD α={_fmt_alpha(row['alpha'])}"
    if row["variant"] == "debiased_kd":
        return f"debiased KD α={_fmt_alpha(row['alpha'])}"
    return f"+{row['fix']} (KD α={_fmt_alpha(row['alpha'])})"


def summarise(cfg: ExperimentCfg, rows: list[dict]) -> dict[str, Any]:
    """Mean ± std over seeds of every metric per model, and of the derived comparisons.

    * ``distillability[alpha][method][metric]``: per seed, the KD student's gain over the KD
      student of the plain teacher (``student_gain``), the teacher's gain over the plain
      teacher (``teacher_gain``), and ``kept`` = mean student gain / mean teacher gain.
    * ``kd_contribution[method][metric]``: debiased KD student minus the student trained alone
      with the same method (for "none": KD at each alpha minus the plain student alone).
    * ``fix_effect[fix][method][metric]``: student with the fix minus KD at ``fix_alpha``.
    """
    by = {(r["variant"], r["method"], r["alpha"], r["fix"], r["seed"]): r for r in rows}
    metrics = metric_names(rows)
    seeds = cfg.seeds
    methods = ("none", *cfg.methods)

    def get(variant, method, alpha, fix, seed, metric):
        r = by.get((variant, method, alpha, fix, seed))
        return None if r is None else r[metric]

    def diffs(a, b, metric):
        out = []
        for s in seeds:
            x, y = get(*a, s, metric), get(*b, s, metric)
            if x is not None and y is not None:
                out.append(x - y)
        return out

    models: dict[str, dict[str, Any]] = {}
    for r in rows:
        key = f"{r['method']} | {_variant_label(r)}"
        models.setdefault(key, {"method": r["method"], "label": _variant_label(r), "values": {m: [] for m in metrics}})
        for m in metrics:
            models[key]["values"][m].append(r[m])

    distill: dict[str, Any] = {}
    for a in cfg.alphas:
        distill[_fmt_alpha(a)] = {}
        for m in cfg.methods:
            d = {}
            for metric in metrics:
                t_gain = diffs(("teacher", m, None, None), ("teacher", "none", None, None), metric)
                s_gain = diffs(("kd", m, a, None), ("kd", "none", a, None), metric)
                tm, sm = mean_std(t_gain)[0], mean_std(s_gain)[0]
                kept = sm / tm if tm and not math.isnan(tm) and abs(tm) > 1e-9 else float("nan")
                d[metric] = {"teacher_gain": t_gain, "student_gain": s_gain, "kept": kept}
            distill[_fmt_alpha(a)][m] = d

    contribution: dict[str, Any] = {}
    for m in cfg.methods:
        contribution[m] = {metric: diffs(("debiased_kd", m, cfg.debiased_kd_alpha, None), ("alone", m, None, None),
                                         metric) for metric in metrics}
        contribution[m]["_vs"] = "debiased KD − student alone with the same method"
    for a in cfg.alphas:
        contribution[f"none (KD α={_fmt_alpha(a)})"] = {
            metric: diffs(("kd", "none", a, None), ("alone", "none", None, None), metric) for metric in metrics}

    fixes: dict[str, Any] = {}
    for fix in cfg.fixes:
        fixes[fix] = {m: {metric: diffs(("fix", m, cfg.fix_alpha, fix), ("kd", m, cfg.fix_alpha, None), metric)
                          for metric in metrics} for m in cfg.methods}
    return {"metrics": metrics, "models": models, "distillability": distill, "kd_contribution": contribution,
            "fix_effect": fixes, "methods": list(methods)}


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _short(metric: str) -> str:
    return {"id_acc": "ID", "ood_acc": "OOD", "worst_group_acc": "worst group"}.get(
        metric, metric.replace("ood_acc[", "OOD ").rstrip("]"))


def render_summary(cfg: ExperimentCfg, summary: dict[str, Any]) -> str:
    """The markdown report: every model, distillability, KD contribution, fix effects, budget."""
    metrics = summary["metrics"]
    t_spec, s_spec = cfg.model_spec("teacher"), cfg.model_spec("student")
    out = [f"# circuitkd run `{cfg.name}`", ""]
    out.append(
        f"Task `{cfg.task}` {cfg.task_args or ''}; teacher {t_spec.n_layers}L d={t_spec.d_model}, student "
        f"{s_spec.n_layers}L d={s_spec.d_model}; budget: teachers {cfg.teacher_steps} steps, students "
        f"{cfg.student_steps} steps, batch {cfg.batch_size}, lr {cfg.lr}; KD temperature {cfg.temperature}; "
        f"seeds {list(cfg.seeds)}. Accuracies in %, mean ± std over seeds.")
    if "wall_seconds" in summary:
        out.append(f"\nWall time: {summary['wall_seconds']:.0f} s ({summary['wall_seconds'] / 60:.1f} min) with "
                   f"{cfg.workers} worker(s); summed training time {summary.get('train_seconds', 0):.0f} s.")
    out += ["", "## Every model", ""]
    body = [[v["method"], v["label"], *[_pm(v["values"][m]) for m in metrics]] for v in summary["models"].values()]
    out.append(_table(["method", "model", *map(_short, metrics)], body))

    out += ["", "## Distillability", "",
            "Gain over the plain model, in points: the teacher's (debiased teacher − plain teacher) and the "
            "KD student's (student of the debiased teacher − student of the plain teacher, same α). "
            "*kept* = student gain / teacher gain (1 = fully distilled; unstable when the teacher gains little).", ""]
    for a, per_method in summary["distillability"].items():
        out += [f"### KD α={a}" + (" (pure KD)" if float(a) == 0 else ""), ""]
        body = []
        for m, d in per_method.items():
            for metric in metrics[1:]:
                e = d[metric]
                kept = "–" if math.isnan(e["kept"]) else f"{e['kept']:.2f}"
                body.append([m, _short(metric), _pm(e["teacher_gain"]), _pm(e["student_gain"]), kept])
        out.append(_table(["method", "metric", "teacher gain", "student gain", "kept"], body))
        out.append("")

    out += ["## KD contribution", "",
            "Debiased KD student − the same student trained alone with the same method; for `none`, the plain "
            "KD student − the plain student alone. Points.", ""]
    body = [[m, *[_pm(d[metric]) for metric in metrics]] for m, d in summary["kd_contribution"].items()]
    out.append(_table(["method", *map(_short, metrics)], body))

    out += ["", f"## Fixes (vs KD at α={_fmt_alpha(cfg.fix_alpha)} from the same teacher)", "",
            "Points gained by each fix over plain KD from the same debiased teacher.", ""]
    body = [[fix, m, *[_pm(d[metric]) for metric in metrics]]
            for fix, per_method in summary["fix_effect"].items() for m, d in per_method.items()]
    out.append(_table(["fix", "method", *map(_short, metrics)], body))
    out.append("")
    return "\n".join(out)


def write_outputs(cfg: ExperimentCfg, rows: list[dict], summary: dict[str, Any], out: Path) -> None:
    from circuitkd.models.checkpoint import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(
        {"config": cfg.to_dict(), "results": [{k: v for k, v in r.items() if k != "skipped"} for r in rows],
         "summary": {k: v for k, v in summary.items() if k != "models"}}, indent=2, default=str))
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
