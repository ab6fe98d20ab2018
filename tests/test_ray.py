"""The study on a local Ray cluster (issue 14): the quick run gives the local executor's numbers,
a worker killed mid-job is retried, a re-run skips finished models, and resources or addresses
the cluster cannot serve are refused before any job starts.

Marker ``ray``: outside the default run; CI installs the ray extra and runs ``pytest -m ray``
as its own step. The cluster is started here with ``ray.init(num_cpus=2)`` and shut down after.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from circuitkd.cli import main
from circuitkd.config import EXECUTION_FIELDS
from circuitkd.run.plan import load_config, plan
from circuitkd.run.runner import run_experiment
from circuitkd.run.study import analyse_run

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_local():
    import ray  # not importorskip: in CI's Ray step a missing Ray must fail, not skip

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def _numbers(run_dir: Path, *, analysis: bool = True) -> dict:
    """Everything a run computed, without wall times and without where it ran."""
    results = json.loads((run_dir / "results.json").read_text())
    results["config"] = {k: v for k, v in results["config"].items() if k not in EXECUTION_FIELDS}
    for row in results["results"]:
        row.pop("seconds")
    for key in ("wall_seconds", "train_seconds"):
        results["summary"].pop(key)
    if not analysis:  # the analysis stage adds its mechanism finding to results.json
        results["summary"]["findings"] = [f for f in results["summary"]["findings"] if f["id"] != "mechanism"]
    out = {"results": results}
    if analysis:
        an = json.loads((run_dir / "analysis" / "analysis.json").read_text())
        for key in ("run", "seconds"):
            an.pop(key)
        out["analysis"] = an
        out["circuits"] = {p.name: p.read_text() for p in sorted((run_dir / "analysis" / "circuits").iterdir())}
        out["figures"] = {p.name: json.loads(p.read_text()) for p in (run_dir / "analysis" / "figures").iterdir()}
    return out


def _attempts(log: Path) -> list[str]:
    return re.findall(r"^=== .*?: (attempt started|finished in|failed after)", log.read_text(), flags=re.M)


def test_quick_run_on_ray_equals_local_and_resumes(quick_run, ray_local, tmp_path):
    cfg = load_config(quick=True, executor="ray")
    out = tmp_path / "ray"
    run_experiment(cfg, out, log=lambda *_: None)
    analyse_run(out, n_pairs=32, n_attention=64, log=lambda *_: None)
    assert _numbers(out) == _numbers(quick_run)

    # One log per training and analysis job, one attempt each.
    jobs = plan(cfg)
    analysis_logs = sorted((out / "logs").glob("analysis-*.log"))
    assert analysis_logs and len(list((out / "logs").iterdir())) == len(jobs) + len(analysis_logs)
    for job in jobs:
        assert _attempts(out / "logs" / f"{job.id}.log") == ["attempt started", "finished in"], job.id

    # A re-run trains only the model whose checkpoint or metrics are missing, as the local executor does.
    victim = "student-init-group_dro-s0"
    shutil.rmtree(out / "models" / victim)
    lines: list[str] = []
    run_experiment(cfg, out, log=lines.append)
    trained = [line for line in lines if line.startswith("[") and "cached" not in line]
    assert len(trained) == 1 and victim in trained[0]
    assert _attempts(out / "logs" / f"{victim}.log") == ["attempt started", "finished in"] * 2
    assert _numbers(out, analysis=False) == _numbers(quick_run, analysis=False)

    # The local executor's run folder resumes on Ray (the executor is not part of what a run computes):
    # every model is finished, so no task runs.
    local = tmp_path / "local"
    shutil.copytree(quick_run, local)
    lines.clear()
    run_experiment(cfg, local, log=lines.append)
    done = [line for line in lines if line.startswith("[")]
    assert len(done) == len(jobs) and all("cached" in line for line in done)
    assert not (local / "logs").exists()


def test_worker_killed_mid_job_is_retried(quick_run, ray_local, tmp_path):
    cfg = load_config(quick=True, executor="ray")
    out = tmp_path / "faulty"
    victim = out / "logs" / "teacher-group_dro-s0.log"
    killed: list[int] = []

    def kill_when_started() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            match = re.search(r"\(pid (\d+),", victim.read_text()) if victim.exists() else None
            if match:
                os.kill(int(match.group(1)), signal.SIGKILL)
                killed.append(int(match.group(1)))
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_when_started, daemon=True)
    watcher.start()
    run_experiment(cfg, out, log=lambda *_: None)
    watcher.join(timeout=5)
    assert killed, "the victim job never started"
    # Killed before it finished (its first attempt has no end line), then run again to the end.
    assert _attempts(victim) == ["attempt started", "attempt started", "finished in"]
    assert _numbers(out, analysis=False) == _numbers(quick_run, analysis=False)
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not leftovers, leftovers


@pytest.mark.parametrize("flags, message", [
    (["--gpus-per-job", "2"], "gpus_per_job=2 but no node of the Ray cluster"),
    (["--cpus-per-job", "3"], "cpus_per_job=3 but no node of the Ray cluster"),
    (["--device", "cuda"], "device 'cuda' but gpus_per_job=0"),
])
def test_resources_the_cluster_cannot_give(ray_local, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["run", "--quick", "--executor", "ray", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("circuitkd: error: ") and message in err[-1], err
    assert not out.exists()


def test_unreachable_address(tmp_path):
    # Its own process: this one may already be attached to the test cluster.
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "circuitkd.cli", "run", "--quick", "--executor", "ray",
                           "--ray-address", "127.0.0.1:1", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("circuitkd: error: cannot reach the Ray cluster at '127.0.0.1:1'"), last
    assert not out.exists()


# Its own driver process: a Ray whose node declares two GPUs (Ray only counts them; the jobs run on
# the CPU), so a job of gpus_per_job=2 is placed and runs under torchrun with two gloo processes.
TWO_GPU_DRIVER = """
import json, sys
import ray
from circuitkd.run.plan import load_config
from circuitkd.run.runner import run_experiment
ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="WARNING")
run_experiment(load_config(quick=True, **json.loads(sys.argv[2])), sys.argv[1], log=print)
ray.shutdown()
"""


def test_job_of_two_gpus_trains_under_torchrun(tmp_path):
    small = dict(methods=[], fixes=[], alphas=[0.5], controls=False, student_budgets=[], device="cpu")
    local = tmp_path / "local"
    run_experiment(load_config(quick=True, workers=1, **small), local, log=lambda *_: None)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", TWO_GPU_DRIVER, str(out),
                           json.dumps({**small, "executor": "ray", "gpus_per_job": 2.0})],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["id"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    expected = {r["id"]: r for r in json.loads((local / "results.json").read_text())["results"]}
    assert sorted(rows) == sorted(expected) == ["student-alone-none-s0", "student-kd0.5-none-s0", "teacher-none-s0"]
    for job_id, row in rows.items():
        log = (out / "logs" / f"{job_id}.log").read_text()
        assert "CUDA_VISIBLE_DEVICES='0,1'" in log and "torch.distributed.run --standalone --nproc_per_node=2" in log
        # Two processes on shards of the same global batches take the single process's steps
        # (up to float summation order): the same accuracies.
        for metric in ("id_acc", "ood_acc", "worst_group_acc"):
            assert row[metric] == pytest.approx(expected[job_id][metric], abs=0.01), (job_id, metric)


KILLED_DRIVER = """
import sys
import ray
from circuitkd.run.plan import load_config
from circuitkd.run.runner import run_experiment
ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
run_experiment(load_config(quick=True, executor="ray"), sys.argv[1], log=print)
"""


def test_killed_driver_leaves_no_half_written_file(quick_run, ray_local, tmp_path):
    from circuitkd.models.checkpoint import is_checkpoint, verify_checkpoint

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    driver = subprocess.Popen([sys.executable, "-c", KILLED_DRIVER, str(out)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(list((out / "metrics").glob("*.json"))) < 3:
        assert driver.poll() is None, "the driver ended before it could be killed"
        time.sleep(0.2)
    driver.kill()  # SIGKILL: no finally, no atexit
    driver.wait()
    time.sleep(15)  # its cluster's processes go with it; nothing may still be writing after that

    def snapshot() -> dict:
        return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    before = snapshot()
    time.sleep(10)
    assert snapshot() == before, "a worker of the killed driver is still writing"
    models = [p for p in (out / "models").iterdir() if not p.name.startswith(".")]
    assert models
    for model in models:  # a model folder is complete or absent
        assert is_checkpoint(model), model
        verify_checkpoint(model)
    for metrics in (out / "metrics").glob("*.json"):
        json.loads(metrics.read_text())
    assert not (out / "results.json").exists()

    # The same run again (on this process's cluster) finishes it with the local executor's numbers.
    run_experiment(load_config(quick=True, executor="ray"), out, log=lambda *_: None)
    assert _numbers(out, analysis=False) == _numbers(quick_run, analysis=False)


def test_a_job_starts_after_the_jobs_it_needs_and_failures_name_their_dependents(ray_local, tmp_path):
    from circuitkd.config import ExperimentCfg
    from circuitkd.errors import CircuitKDError
    from circuitkd.run.executors import RemoteJob, run_remote

    def make(path: str, seconds: float) -> float:
        time.sleep(seconds)
        Path(path).write_text("made")
        return seconds

    def read(path: str) -> str:  # FileNotFoundError when it runs before the job that makes the file
        return Path(path).read_text()

    def boom() -> None:
        raise ValueError("boom")

    cfg = ExperimentCfg(executor="ray")
    made = str(tmp_path / "made")
    # Two CPUs: without the dependency, "b" would start beside "a" and find nothing.
    jobs = [RemoteJob("a", make, (made, 3.0)), RemoteJob("b", read, (made,), deps=("a",))]
    assert run_remote(jobs, cfg, tmp_path) == {"a": 3.0, "b": "made"}
    jobs = [RemoteJob("x", boom), RemoteJob("y", read, (made,), deps=("x",)), RemoteJob("z", read, (made,))]
    with pytest.raises(CircuitKDError, match=r"^2 of 3 jobs failed .*: x: ValueError: boom; y \(needs x\)$"):
        run_remote(jobs, cfg, tmp_path)
    assert "ValueError: boom" in (tmp_path / "logs" / "x.log").read_text()
