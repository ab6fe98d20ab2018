"""``circuitkd run``'s training stage: run every job of the plan (local process pool or Ray), skip
finished ones, and write ``results.json``, ``results.csv`` and ``summary.md`` atomically."""
from __future__ import annotations

import csv
import json
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

from circuitkd.config import EXECUTION_FIELDS, ExperimentCfg
from circuitkd.errors import CircuitKDError
from circuitkd.run.jobs import _run_in_worker, run_job, _spec, _where, _worker_init
from circuitkd.run.plan import Job, plan
from circuitkd.run.summary import render_summary, summarise
from circuitkd.run.tasks import load_task


def run_experiment(cfg: ExperimentCfg, out: str | Path, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the grid into the folder ``out`` (resuming it if it exists); returns the summary dict.

    Writes ``config.json``, ``results.json``, ``results.csv`` and ``summary.md``.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    prepare_folder(cfg, out)
    jobs = plan(cfg)
    t0 = time.perf_counter()
    log(f"circuitkd run {cfg.name!r}: {len(jobs)} models, {len(cfg.seeds)} seed(s), {_where(cfg)} -> {out}")
    rows = run_jobs(cfg, jobs, out, log)
    wall = time.perf_counter() - t0
    ordered = [rows[j.id] for j in jobs]
    summary = summarise(cfg, ordered)
    summary["wall_seconds"] = wall
    summary["train_seconds"] = sum(r["seconds"] for r in ordered if not r.get("skipped"))
    write_outputs(cfg, ordered, summary, out)
    log_targets(summary["banner"], summary.get("thin_targets", []), len(summary["targets"]), log)
    log(f"done in {wall:.0f}s: {out / 'summary.md'}")
    return summary


def log_targets(banner: list[str], thin: list[str], n_targets: int, log: Callable[[str], None]) -> None:
    """The run's warnings on the console, where it is watched: each banner line (a missed target, too
    few seeds) loudly, each thin target plainly, or that all ``n_targets`` held on every seed."""
    for line in banner:
        log(f"⚠ UNRELIABLE: {line}")
    for line in thin:
        log(f"thin target: {line}")
    if n_targets and not banner and not thin:
        log(f"every target met on every seed ({n_targets} targets)")


def prepare_folder(cfg: ExperimentCfg, out: Path, *, any_seeds: bool = False) -> None:
    """Check that the task and every model spec of ``cfg`` fit, then make ``out`` (or check that the run
    it holds has the same config) and write ``config.json``; nothing is touched when a check fails.

    With ``any_seeds`` a folder whose config differs in its seeds only is accepted and its
    ``config.json`` kept (a model's job, and so its folder, names its seed)."""
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
        skip = set(EXECUTION_FIELDS) | ({"seeds"} if any_seeds else set())
        computed = lambda d: {k: v for k, v in d.items() if k not in skip}  # noqa: E731
        if computed(json.loads(cfg_path.read_text())) != computed(json.loads(cfg.to_json())):
            raise CircuitKDError(
                f"{out} holds a run with a different config; choose another --out folder or delete it"
            )
        if any_seeds:
            return
    cfg.to_json(cfg_path)


def run_jobs(cfg: ExperimentCfg, jobs: list[Job], out: Path, log: Callable[[str], None]) -> dict[str, dict]:
    """Train (or find finished) every job of ``jobs`` into ``out/models``, in dependency order, on the
    config's executor; returns each job's result row by id."""
    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    n = len(jobs)

    def report(row: dict) -> None:
        what = "cached" if row.get("skipped") else f"{row['seconds']:.0f}s"
        log(f"[{len(rows)}/{n}] {row['id']:<28} ood {row['ood_acc']:.3f}  worst-group "
            f"{row['worst_group_acc']:.3f}  ({what}; {time.perf_counter() - t0:.0f}s elapsed)")

    if cfg.executor == "ray":
        from circuitkd.run.executors import run_grid

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
    return rows


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

