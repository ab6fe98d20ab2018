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


def _shell_commands(path, program: str) -> list[list[str]]:
    import re
    import shlex

    text = path.read_text()
    blocks = re.findall(r"^```bash[ \t]*\n(.*?)^```", text, flags=re.M | re.S)
    return [shlex.split(line.split("#")[0]) for block in blocks for line in block.splitlines()
            if line.startswith(program + " ")]


def test_the_cluster_commands_shown_parse_and_make_a_valid_config():
    """README's and docs/cluster.md's ``circuitkd run --executor ray`` lines use flags that exist, on
    the README's MNLI/BERT config (the cluster itself is not here: tests/test_ray.py runs a local one)."""
    import re
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from circuitkd.cli import build_parser

    root = Path(__file__).resolve().parents[1]
    toml = re.search(r"^```toml\n(# mnli-bert.toml.*?)^```", (root / "README.md").read_text(), flags=re.M | re.S)
    assert toml, "README's mnli-bert.toml block is gone"
    config = root / "mnli-bert.toml"
    commands = [c for doc in (root / "README.md", root / "docs" / "cluster.md")
                for c in _shell_commands(doc, "circuitkd") if "--executor" in c]
    assert len(commands) == 2
    for argv in commands:
        args = build_parser().parse_args(argv[1:])
        assert args.config == config.name and args.executor == "ray"
        cfg = ExperimentCfg.from_dict({**tomllib.loads(toml.group(1)), "executor": args.executor,
                                       "ray_address": args.ray_address, "cpus_per_job": args.cpus_per_job,
                                       "gpus_per_job": args.gpus_per_job})
        assert (cfg.task, cfg.executor, cfg.ray_address, cfg.gpus_per_job) == ("mnli", "ray", "auto", 1.0)
    torchrun = _shell_commands(root / "docs" / "cluster.md", "python")
    assert torchrun and torchrun[0][torchrun[0].index("-m", 3) + 1] == "circuitkd.run.executors"
