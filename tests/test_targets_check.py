"""``circuitkd targets``: a config's accuracy targets checked seed by seed on the models they name only,
reusing a run folder's finished models without touching its config or results."""
import json
import shutil

import pytest

from circuitkd.cli import main
from circuitkd.errors import CircuitKDError
from circuitkd.run.plan import load_config, plan
from circuitkd.run.targets import check_targets, target_jobs


def test_target_jobs_are_the_controls_and_the_teachers():
    cfg = load_config(quick=True, seeds=(0, 1))
    ids = {j.id for j in target_jobs(cfg)}
    expected = {f"{role}-control-s{s}" for role in ("teacher", "student") for s in (0, 1)}
    expected |= {f"teacher-{m}-s{s}" for m in ("none", *cfg.methods) for s in (0, 1)}
    assert ids == expected
    assert len(ids) < len(plan(cfg))
    # a debiased teacher's dependency is among them (confidence regularisation's: the plain teacher)
    conf = load_config(quick=True, seeds=(0, 1), methods=("confreg",), controls=False)
    jobs = target_jobs(conf)
    assert {j.id for j in jobs} == {f"teacher-{m}-s{s}" for m in ("none", "confreg") for s in (0, 1)}
    assert all(dep in {j.id for j in jobs} for j in jobs for dep in j.deps) and any(j.deps for j in jobs)


def test_targets_reuse_a_run_folder_and_count_seeds(quick_run, tmp_path, capsys):
    run = tmp_path / "quick"
    shutil.copytree(quick_run, run)
    config_before = (run / "config.json").read_text()
    results_before = (run / "results.json").read_text()
    logs = []
    result = check_targets(load_config(quick=True, seeds=(0, 1)), run, log=logs.append)
    trained = [line for line in logs if line.startswith("[") and "cached" not in line]
    cached = [line for line in logs if line.startswith("[") and "cached" in line]
    # seed 0's models come from the run; only seed 1's are trained
    assert cached and all("-s0 " in line for line in cached) and all("-s1 " in line for line in trained)
    assert (run / "config.json").read_text() == config_before
    assert (run / "results.json").read_text() == results_before
    by = {t["name"]: t for t in result["targets"]}
    run_rows = {r["id"]: r for r in json.loads(results_before)["results"]}
    plain = by["plain_teacher_id"]
    assert plain["n_seeds"] == 2 and plain["per_seed"][0] == run_rows["teacher-none-s0"]["id_acc"]
    assert plain["seeds_met"] == sum(v >= plain["target"] - 1e-6 for v in plain["per_seed"])
    md = (run / "targets.md").read_text()
    assert "| target | mean | met on the mean | per seed | seeds met alone |" in md
    assert f"| plain teacher ID ≥ {plain['target']:.2f} | {plain['value']:.3f} |" in md
    saved = json.loads((run / "targets.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["targets_met"] == result["targets_met"]
    # the quick run's tiny models miss their targets: the console says so and the command fails
    assert not result["targets_met"] and any(line.startswith("⚠ UNRELIABLE: ") for line in logs)
    # another number of worker processes computes the same models: the folder is still this run's
    status = main(["targets", "--seeds", "0-1", "--out", str(run), "--config", str(run / "config.json"),
                   "--workers", "1"])
    captured = capsys.readouterr()
    assert status == 1 and captured.out.strip().endswith("targets.md"), captured.err[-2000:]


def test_targets_refuse_bad_requests(tmp_path, capsys):
    with pytest.raises(CircuitKDError, match=r"needs two or more seeds; got \[0\]"):
        check_targets(load_config(quick=True, seeds=(0,)), tmp_path / "one")
    assert not (tmp_path / "one").exists()
    other = tmp_path / "other"
    other.mkdir()
    load_config(quick=True, lr=0.001).to_json(other / "config.json")
    with pytest.raises(CircuitKDError, match="holds a run with a different config"):
        check_targets(load_config(quick=True, seeds=(0, 1)), other)
    for bad in ("x", "2-", "0,0", "-1"):
        with pytest.raises(SystemExit):
            main(["targets", "--seeds", bad, "--out", str(tmp_path / "x")])
    assert main(["targets", "--arm", "vision", "--config", "c.json", "--seeds", "0,1", "--out", str(tmp_path / "y")]) == 2
    assert "give one of them" in capsys.readouterr().err and not (tmp_path / "y").exists()
