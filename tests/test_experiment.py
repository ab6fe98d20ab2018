"""The experiment grid: planning, summary arithmetic, the quick preset end to end, resuming, the CLI."""
import json
import shutil

import pytest
import torch

from circuitkd.cli import main
from circuitkd.config import ExperimentCfg
from circuitkd.errors import CircuitKDError
from circuitkd.run.plan import default_config, load_config, plan
from circuitkd.run.summary import render_summary, summarise
from circuitkd.run.runner import run_experiment


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def test_default_config_ships_and_round_trips():
    cfg = default_config()
    assert cfg.task == "synthetic_nli" and set(cfg.methods) == {"reweight", "poe"} and len(cfg.seeds) >= 3
    assert cfg.weight_decay == 0.1
    assert ExperimentCfg.from_json(cfg.to_json()) == cfg
    quick = load_config(quick=True)
    assert quick.name == "default-quick" and quick.seeds == (0,) and quick.student_steps < cfg.student_steps
    with pytest.raises(CircuitKDError, match="unknown fix"):
        cfg.replace(fixes=("distil-harder",))
    with pytest.raises(CircuitKDError, match="unknown ExperimentCfg field"):
        ExperimentCfg.from_dict({"nmae": "x"})


def test_weight_decay_reaches_every_model_of_the_grid():
    from circuitkd.run.jobs import _train_cfg

    cfg = default_config().replace(weight_decay=0.3)
    assert _train_cfg(cfg, "teacher", 1).weight_decay == 0.3
    assert _train_cfg(cfg, "student", 2, steps=7).weight_decay == 0.3
    assert _train_cfg(ExperimentCfg(), "student", 2).weight_decay == 0.01  # AdamW's usual default
    assert _train_cfg(default_config(), "teacher", 0).weight_decay == 0.1  # the shipped NLI arm's
    with pytest.raises(CircuitKDError, match="weight_decay"):
        default_config().replace(weight_decay=-0.1)


def test_plan_covers_grid_in_dependency_order():
    cfg = ExperimentCfg(methods=("poe", "confreg"), seeds=(0, 1), alphas=(0.0, 0.5), fixes=("augment", "init"))
    jobs = plan(cfg)
    ids = [j.id for j in jobs]
    assert len(ids) == len(set(ids))
    # teachers+alone, KD at two alphas, (debiased KD + fixes) per method, the two controls
    per_seed = 3 * 2 + 3 * 2 + 2 * (1 + 2) + 2
    assert len(jobs) == 2 * per_seed
    seen = set()
    for j in jobs:
        assert set(j.deps) <= seen, (j.id, j.deps)
        seen.add(j.id)
    by_id = {j.id: j for j in jobs}
    assert by_id["teacher-confreg-s1"].deps == ("teacher-none-s1",)
    assert set(by_id["student-dkd-confreg-s0"].deps) == {"teacher-confreg-s0", "student-alone-none-s0"}
    assert by_id["student-init-poe-s0"].alpha == cfg.fix_alpha
    assert by_id["teacher-control-s0"].variant == by_id["student-control-s0"].variant == "control"

    # The budget sweep: KD from the plain and the sweep method's teacher at each extra budget.
    swept = plan(cfg.replace(student_budgets=(100, cfg.student_steps, 900), budget_method="confreg",
                             controls=False))
    extra = [j for j in swept if j.steps is not None]
    assert sorted((j.method, j.steps, j.seed) for j in extra) == sorted(
        (m, b, s) for m in ("none", "confreg") for b in (100, 900) for s in (0, 1))
    assert all(j.alpha == cfg.budget_alpha and j.deps == (f"teacher-{j.method}-s{j.seed}",) for j in extra)
    assert len(swept) == len(jobs) - 4 + len(extra)


def _row(variant, method, seed, ood, alpha=None, fix=None):
    return {"id": f"{variant}-{method}-{alpha}-{fix}-{seed}", "variant": variant, "method": method, "seed": seed,
            "alpha": alpha, "fix": fix, "role": "teacher" if variant == "teacher" else "student",
            "id_acc": 0.9, "ood_acc": ood, "worst_group_acc": ood / 2, "ood_acc[cue]": ood}


def test_summary_arithmetic_by_hand():
    cfg = ExperimentCfg(methods=("poe",), seeds=(0, 1), alphas=(0.0,), fixes=("init",), fix_alpha=0.0)
    rows = []
    for seed, (t0, t1, s0, s1, alone_none, alone_poe, dkd, init) in enumerate(
            [(0.40, 0.60, 0.30, 0.40, 0.30, 0.45, 0.50, 0.46), (0.42, 0.62, 0.32, 0.38, 0.31, 0.47, 0.49, 0.40)]):
        rows += [_row("teacher", "none", seed, t0), _row("teacher", "poe", seed, t1),
                 _row("kd", "none", seed, s0, 0.0), _row("kd", "poe", seed, s1, 0.0),
                 _row("alone", "none", seed, alone_none), _row("alone", "poe", seed, alone_poe),
                 _row("debiased_kd", "poe", seed, dkd, 0.5), _row("fix", "poe", seed, init, 0.0, "init")]
    s = summarise(cfg, rows)
    d = s["distillability"]["0"]["poe"]["ood_acc"]
    assert d["teacher_gain"] == pytest.approx([0.20, 0.20])
    assert d["student_gain"] == pytest.approx([0.10, 0.06])
    assert d["kept"] == pytest.approx(0.08 / 0.20)
    assert s["kd_contribution"]["poe"]["ood_acc"] == pytest.approx([0.05, 0.02])
    assert s["fix_effect"]["init"]["poe"]["ood_acc"] == pytest.approx([0.06, 0.02])
    md = render_summary(cfg, s)
    assert "| poe | OOD | 20.0 ± 0.0 | 8.0 ± 2.8 | 0.40 |" in md
    assert "lr 0.001, weight decay 0.01;" in md  # the budget line names the optimiser's settings


def test_quick_preset_runs_resumes_and_cli(tmp_path, capsys):
    cfg = load_config(quick=True, workers=1, device="cpu")
    out = tmp_path / "run"
    summary = run_experiment(cfg, out, log=lambda m: None)
    for name in ("config.json", "results.json", "results.csv", "summary.md"):
        assert (out / name).is_file()
    results = json.loads((out / "results.json").read_text())["results"]
    assert len(results) == len(plan(cfg))
    assert all(r["steps"] in (cfg.teacher_steps, cfg.student_steps, *cfg.student_budgets) and 0 <= r["ood_acc"] <= 1
               for r in results)
    md = (out / "summary.md").read_text()
    for heading in ("## Every model", "## Distillability", "## KD contribution", "## Fixes", "Wall time"):
        assert heading in md
    assert summary["wall_seconds"] > 0

    # An interrupted run resumes: only the model whose results are missing is trained again.
    shutil.rmtree(out / "models" / "student-init-group_dro-s0")
    (out / "metrics" / "student-init-group_dro-s0.json").unlink()
    logs = []
    run_experiment(cfg, out, log=logs.append)
    trained = [line for line in logs if line.startswith("[") and "cached" not in line]
    assert len(trained) == 1 and "student-init-group_dro-s0" in trained[0]

    # The CLI on the same folder: everything cached, whatever the number of worker processes (where jobs
    # run, not what they compute); a config that computes something else is refused.
    assert main(["run", "--arm", "nli", "--quick", "--out", str(out), "--workers", "1", "--device", "cpu"]) == 0
    assert str(out) in capsys.readouterr().out
    logs.clear()
    run_experiment(cfg.replace(workers=2), out, log=logs.append)
    assert all("cached" in line for line in logs if line.startswith("["))
    assert main(["run", "--arm", "nli", "--quick", "--out", str(out), "--workers", "2", "--device", "cuda"]) == 2
    assert "different config" in capsys.readouterr().err
