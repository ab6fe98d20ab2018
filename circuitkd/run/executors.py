"""The study's jobs as Ray tasks: from a laptop to a GPU cluster.

``circuitkd run --executor ray`` makes every training job of the grid (one model: train or
distil it, evaluate it, write its metrics) and every analysis job (one teacher/student pair:
head patching, attention diff, circuits) a task of Ray (Moritz et al. 2018, "Ray: A Distributed
Framework for Emerging AI Applications", OSDI), asking the cluster for ``cpus_per_job`` CPUs and
``gpus_per_job`` GPUs. A student's need for its teacher's checkpoint is a Ray task dependency.

* **Storage.** Checkpoints and metrics go to the run folder (shared storage on a cluster:
  every node must see the same path) through atomic writes, so a killed worker or driver
  leaves no half-written model or results file.
* **Faults.** A task whose worker process dies is run again, up to ``job_retries`` times
  (Ray's ``max_retries``); an exception inside a job is not retried, and the jobs that do not
  depend on it still run. A re-run skips the models whose checkpoint and metrics exist,
  exactly as the local executor does.
* **Progress.** The driver draws one bar over the jobs (finished, with running and failed
  counts); each job appends what it prints, with a header per attempt and the traceback of a
  failure, to ``<run>/logs/<job>.log``.
* **Several GPUs in one job** (``gpus_per_job`` > 1): Ray reserves the GPUs on one node and the
  task runs the job under ``torchrun`` (:mod:`circuitkd.train.loop`'s DDP), one process per GPU;
  rank 0 writes the checkpoint.

Bad settings (Ray not installed, an unreachable address, more CPUs or GPUs per job than any
node has) raise :class:`~circuitkd.errors.CircuitKDError` in :func:`ray_cluster`, before any
job starts.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from circuitkd.config import ExperimentCfg
from circuitkd.errors import CircuitKDError

#: Per-job logs, under the run folder.
LOG_DIR = "logs"
#: How long a HOST:PORT address may take to accept a TCP connection before it counts as unreachable.
CONNECT_TIMEOUT_S = 5.0


def import_ray():
    """The ``ray`` module, or a CircuitKDError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise CircuitKDError(f"executor 'ray' needs Ray, which is not installed here ({exc}); "
                             f"install it with: pip install -e \".[ray]\"") from None
    return ray


# --------------------------------------------------------------------- the cluster


@contextlib.contextmanager
def ray_cluster(cfg: ExperimentCfg) -> Iterator[Any]:
    """Join (or start) the Ray cluster of ``cfg.ray_address`` and check it can run ``cfg``'s jobs.

    A Ray already initialised in this process (``ray.init(...)`` by the caller) is used as it
    is and left running; one started here is shut down on exit. Yields the ``ray`` module.
    """
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        _init(ray, cfg.ray_address)
    try:
        check_resources(ray, cfg)
        yield ray
    finally:
        if started:
            ray.shutdown()


def _init(ray, address: str) -> None:
    where = address or os.environ.get("RAY_ADDRESS", "")
    if where not in ("", "auto", "local") and not where.startswith("ray://"):
        host, _, port = where.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as exc:
            raise CircuitKDError(f"cannot reach the Ray cluster at {where!r} ({exc}); start it with "
                                 f"`ray start --head` there, or check --ray-address") from None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if not where or where == "local":
        # A new single-node Ray: no dashboard, and workers' output stays in the per-job logs.
        kwargs.update(include_dashboard=False, log_to_driver=False)
    try:
        ray.init(address=address or None, **kwargs)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError, or a bare Exception (node start timeout)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = f"connect to the Ray cluster at {where!r}" if where and where != "local" else "start a local Ray"
        raise CircuitKDError(f"cannot {what}: {first}") from None


def check_resources(ray, cfg: ExperimentCfg) -> None:
    """Refuse settings the cluster cannot meet: more CPUs or GPUs per job than its largest node has,
    or a CUDA device for jobs given no GPU."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    where = ray.get_runtime_context().gcs_address
    most_cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
    most_gpus = max((n["Resources"].get("GPU", 0.0) for n in nodes), default=0.0)
    if cfg.cpus_per_job > most_cpus:
        raise CircuitKDError(f"cpus_per_job={cfg.cpus_per_job} but no node of the Ray cluster at {where} has more "
                             f"than {most_cpus:g} CPUs")
    if cfg.gpus_per_job > most_gpus:
        raise CircuitKDError(f"gpus_per_job={cfg.gpus_per_job:g} but no node of the Ray cluster at {where} has more "
                             f"than {most_gpus:g} GPUs")
    if cfg.device.startswith("cuda") and cfg.gpus_per_job == 0:
        raise CircuitKDError(f"device {cfg.device!r} but gpus_per_job=0: Ray would give the jobs no GPU; "
                             f"set gpus_per_job (e.g. --gpus-per-job 1)")


# ------------------------------------------------------------------ running jobs


@dataclass(frozen=True)
class RemoteJob:
    """One Ray task: ``fn(*args, **kwargs)`` once the jobs named in ``deps`` have finished.

    ``fn`` must be a module-level function (Ray ships it by name).
    """

    id: str
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    deps: tuple = ()


class _Started:
    """A Ray actor that records which jobs have started (for the progress bar's running count)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def start(self, job_id: str) -> None:
        self.ids.add(job_id)

    def started(self) -> set[str]:
        return self.ids


@contextlib.contextmanager
def job_log(run_dir: str | Path, job_id: str) -> Iterator[None]:
    """Append everything the job prints to ``<run>/logs/<job_id>.log``, with a header per attempt
    (time, host, pid, GPUs) and the traceback of a failure."""
    path = Path(run_dir) / LOG_DIR / f"{job_id}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as fh:
        fh.write(f"=== {job_id}: attempt started {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()} "
                 f"(pid {os.getpid()}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})\n")
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                yield
        except BaseException:
            fh.write(traceback.format_exc())
            fh.write(f"=== {job_id}: failed after {time.perf_counter() - t0:.1f}s\n")
            raise
        fh.write(f"=== {job_id}: finished in {time.perf_counter() - t0:.1f}s\n")


def _call(job_id: str, run_dir: str, threads: int, started, fn: Callable[..., Any], args: tuple, kwargs: dict,
          *_deps: Any) -> Any:
    """The body of every Ray task (``_deps`` are the results of the jobs it waited for)."""
    import torch

    torch.set_num_threads(threads)
    started.start.remote(job_id)
    with job_log(run_dir, job_id):
        return fn(*args, **kwargs)


def run_remote(jobs: list[RemoteJob], cfg: ExperimentCfg, run_dir: str | Path, *, what: str = "jobs",
               num_gpus: Optional[float] = None,
               on_done: Callable[[str, Any], None] = lambda job_id, result: None) -> dict[str, Any]:
    """Run ``jobs`` (each after the ones it depends on) as Ray tasks; returns their results by id.

    Each task asks for ``cfg.cpus_per_job`` CPUs (its torch threads) and ``num_gpus`` GPUs
    (default ``cfg.gpus_per_job``) and is retried ``cfg.job_retries`` times when its worker dies.
    ``on_done(job_id, result)`` is called on the driver as each job finishes. Jobs whose
    dependencies are not among ``jobs`` count those as finished. When some jobs fail, the others
    still run, and then a CircuitKDError names the failures. Must be called inside
    :func:`ray_cluster`.
    """
    ray = import_ray()
    from tqdm.auto import tqdm

    known = {j.id for j in jobs}
    remote = ray.remote(_call).options(num_cpus=cfg.cpus_per_job,
                                       num_gpus=cfg.gpus_per_job if num_gpus is None else num_gpus,
                                       max_retries=cfg.job_retries, retry_exceptions=False)
    started = ray.remote(num_cpus=0)(_Started).remote()
    refs: dict[str, Any] = {}
    results: dict[str, Any] = {}
    failed: dict[str, BaseException] = {}
    deps_of = {j.id: j.deps for j in jobs}
    waiting: dict[Any, str] = {}  # submitted, not yet finished
    shown = (-1, -1)  # the running and failed counts on the bar
    bar = tqdm(total=len(jobs), desc=what, unit="job", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    try:
        for job in jobs:
            late = [d for d in job.deps if d in known and d not in refs]
            if late:
                raise CircuitKDError(f"job {job.id} comes before the jobs it needs: {late}")
            dep_refs = [refs[d] for d in job.deps if d in refs]
            refs[job.id] = remote.remote(job.id, str(run_dir), cfg.cpus_per_job, started, job.fn, job.args,
                                         job.kwargs, *dep_refs)
            waiting[refs[job.id]] = job.id
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=1.0)
            for ref in ready:
                job_id = waiting.pop(ref)
                try:
                    results[job_id] = ray.get(ref)
                except Exception as exc:  # the job's own error, or a worker that died on every retry
                    failed[job_id] = exc
                    continue
                with tqdm.external_write_mode(file=sys.stderr):
                    on_done(job_id, results[job_id])
                bar.update(1)
            running = len(ray.get(started.started.remote()) - results.keys() - failed.keys())
            if (running, len(failed)) != shown:  # redrawn on a change only: a log file gets a line per change
                shown = (running, len(failed))
                bar.set_postfix_str(f"running {running}, failed {len(failed)}", refresh=True)
    finally:
        for ref in waiting:  # an interrupted driver stops its jobs rather than leaving them running
            ray.cancel(ref, force=True)
        bar.close()
        ray.kill(started)
    if failed:
        raise CircuitKDError(f"{len(failed)} of {len(jobs)} {what} failed (logs in {Path(run_dir) / LOG_DIR}): "
                             + "; ".join(_why(job_id, exc, failed, deps_of) for job_id, exc in failed.items()))
    return results


def _why(job_id: str, exc: BaseException, failed: dict, deps_of: dict) -> str:
    broken = [d for d in deps_of[job_id] if d in failed]
    if broken:
        return f"{job_id} (needs {', '.join(broken)})"
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{job_id}: {type(cause).__name__}: {text[-1] if text else ''}"


# ------------------------------------------------------------- the grid's jobs


def train_job(job, cfg: ExperimentCfg, run_dir: str) -> dict[str, Any]:
    """One model of the grid in a Ray task: :func:`circuitkd.run.run_job`, under ``torchrun``
    with one process per GPU when the job has more than one."""
    from circuitkd.run.jobs import run_job

    if cfg.gpus_per_job > 1:
        return _torchrun_job(job, cfg, run_dir)
    return run_job(job, cfg, run_dir)


def _torchrun_job(job, cfg: ExperimentCfg, run_dir: str) -> dict[str, Any]:
    from circuitkd.run.jobs import finished_row

    n = int(cfg.gpus_per_job)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "circuitkd.run.executors", str(run_dir), job.id]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cfg.cpus_per_job // n))}
    print("$", " ".join(cmd), flush=True)
    stream = sys.stdout if _has_fileno(sys.stdout) else None
    proc = subprocess.run(cmd, env=env, stdout=stream, stderr=subprocess.STDOUT if stream else None)
    if proc.returncode != 0:
        raise CircuitKDError(f"torchrun job {job.id} on {n} GPUs exited with code {proc.returncode}")
    row = finished_row(job, run_dir)
    if row is None:
        raise CircuitKDError(f"torchrun job {job.id} exited without writing its checkpoint and metrics")
    row.pop("skipped", None)
    return row


def _has_fileno(stream) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def run_grid(cfg: ExperimentCfg, jobs: list, run_dir: str | Path, *, on_done: Callable[[dict], None]) -> None:
    """The grid's ``jobs`` (in dependency order) on Ray; ``on_done(row)`` for each model, finished ones first."""
    from circuitkd.run.jobs import finished_row

    todo = []
    for job in jobs:
        row = finished_row(job, run_dir)
        if row is None:
            todo.append(job)
        else:
            on_done(row)
    if not todo:
        return
    with ray_cluster(cfg):
        run_remote([RemoteJob(j.id, train_job, (j, cfg, str(run_dir)), deps=j.deps) for j in todo], cfg, run_dir,
                   what="models", on_done=lambda job_id, row: on_done(row))


def _main(argv: list[str]) -> int:
    """``python -m circuitkd.run.executors RUN_DIR JOB_ID``: one grid job in one ``torchrun`` process."""
    import torch

    from circuitkd.run.plan import plan
    from circuitkd.run.jobs import run_job

    run_dir, job_id = argv
    cfg = ExperimentCfg.from_json(Path(run_dir) / "config.json")
    job = {j.id: j for j in plan(cfg)}[job_id]
    if torch.cuda.is_available() and cfg.device in ("auto", "cuda"):
        # Each rank builds its model on its own GPU (torchrun's LOCAL_RANK of the GPUs Ray gave the task).
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(rank)
        cfg = cfg.replace(device=f"cuda:{rank}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run_job(job, cfg, run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
