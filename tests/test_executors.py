"""The executor setting: config validation and bad input on the command line (no Ray needed).

The runs on a Ray cluster are in tests/test_ray.py (marker ``ray``, CI's own step).
"""
import sys

import pytest

from circuitkd.cli import main
from circuitkd.config import ExperimentCfg
from circuitkd.errors import CircuitKDError


@pytest.mark.parametrize("changes, message", [
    ({"executor": "slurm"}, r"ExperimentCfg.executor must be one of \['local', 'ray'\], got 'slurm'"),
    ({"ray_address": "headnode"}, r"ExperimentCfg.ray_address must be .* 'HOST:PORT', got 'headnode'"),
    ({"ray_address": "headnode:99999"}, r"ExperimentCfg.ray_address must be .*, got 'headnode:99999'"),
    ({"cpus_per_job": 0}, r"ExperimentCfg.cpus_per_job must be >= 1, got 0"),
    ({"gpus_per_job": -1.0}, r"ExperimentCfg.gpus_per_job must be a GPU count >= 0.*, got -1.0"),
    ({"gpus_per_job": 1.5}, r"ExperimentCfg.gpus_per_job must be .*a whole number above, got 1.5"),
    ({"job_retries": -1}, r"ExperimentCfg.job_retries must be >= 0, got -1"),
])
def test_bad_executor_settings_fail_when_the_config_is_built(changes, message):
    with pytest.raises(CircuitKDError, match=message):
        ExperimentCfg(**changes)


def test_good_executor_settings():
    cfg = ExperimentCfg(executor="ray", ray_address="10.0.0.7:6379", cpus_per_job=4, gpus_per_job=0.5)
    assert ExperimentCfg.from_json(cfg.to_json()) == cfg
    assert ExperimentCfg(gpus_per_job=4.0).gpus_per_job == 4 and ExperimentCfg(ray_address="auto").ray_address == "auto"


def _refused(capsys, argv, message, out):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("circuitkd: error: ") and message in err[-1], err
    assert not out.exists(), "nothing may be written before the check"


def test_ray_not_installed_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "run"
    _refused(capsys, ["run", "--quick", "--executor", "ray", "--out", str(out)],
             "executor 'ray' needs Ray, which is not installed", out)


def test_ray_flags_without_the_ray_executor(tmp_path, capsys):
    out = tmp_path / "run"
    _refused(capsys, ["run", "--quick", "--gpus-per-job", "1", "--out", str(out)], "need --executor ray", out)
    _refused(capsys, ["run", "--quick", "--executor", "ray", "--ray-address", "headnode", "--out", str(out)],
             "ExperimentCfg.ray_address must be", out)
