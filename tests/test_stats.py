"""Bootstrap intervals and verdicts (circuitkd.stats), and the study's targets, banner and verdicts."""
import math

import numpy as np
import pytest

from circuitkd.config import ExperimentCfg
from circuitkd.errors import CircuitKDError
from circuitkd.run.summary import render_summary, summarise
from circuitkd.stats import Interval, bootstrap_interval, combine, seed_interval, verdict


def _correct(rng, p, n_seeds=3, n=800):
    return rng.random((n_seeds, n)) < np.asarray(p).reshape(-1, 1)


def test_point_estimate_is_the_plain_statistic():
    rng = np.random.default_rng(0)
    a, b = _correct(rng, [0.8, 0.7, 0.9]), _correct(rng, [0.5, 0.6, 0.4])
    iv = bootstrap_interval({"a": a, "b": b}, lambda acc: (acc["a"] - acc["b"]).mean(-1), n_resamples=500)
    assert iv.estimate == pytest.approx(a.mean() - b.mean())
    assert iv.lo < iv.estimate < iv.hi and iv.n_seeds == 3
    mask = np.zeros(800)
    mask[:100] = 1
    masked = bootstrap_interval({"a": a}, lambda acc: acc["a"].mean(-1), masks={"a": mask}, n_resamples=200)
    assert masked.estimate == pytest.approx(a[:, :100].mean())


def test_interval_reflects_seed_noise_not_only_example_noise():
    # Same per-example noise, very different seeds: the interval must widen with the seed spread.
    rng = np.random.default_rng(1)
    steady = bootstrap_interval({"a": _correct(rng, [0.7, 0.7, 0.7])}, lambda acc: acc["a"].mean(-1),
                                n_resamples=1000)
    spread = bootstrap_interval({"a": _correct(rng, [0.5, 0.7, 0.9])}, lambda acc: acc["a"].mean(-1),
                                n_resamples=1000)
    assert (spread.hi - spread.lo) > 2 * (steady.hi - steady.lo)


def test_interval_covers_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    hits = 0
    trials = 60
    for t in range(trials):
        a, b = _correct(rng, [0.75] * 3, n=400), _correct(rng, [0.65] * 3, n=400)
        iv = bootstrap_interval({"a": a, "b": b}, lambda acc: (acc["a"] - acc["b"]).mean(-1), n_resamples=400,
                                seed=t)
        hits += iv.lo <= 0.10 <= iv.hi
    assert hits >= 0.85 * trials


def test_one_seed_gives_no_interval_and_an_inconclusive_verdict():
    rng = np.random.default_rng(3)
    iv = bootstrap_interval({"a": _correct(rng, [0.9], n_seeds=1)}, lambda acc: acc["a"].mean(-1))
    assert iv.n_seeds == 1 and math.isnan(iv.lo) and math.isnan(iv.hi)
    assert verdict(iv) == "inconclusive (1 seed)"
    assert combine(["holds", verdict(iv)]) == "inconclusive (1 seed)"


def test_bad_shapes_are_refused():
    with pytest.raises(CircuitKDError, match="share one"):
        bootstrap_interval({"a": np.ones((3, 10)), "b": np.ones((2, 10))}, lambda acc: acc["a"].mean(-1))
    with pytest.raises(CircuitKDError, match="at least one"):
        bootstrap_interval({}, lambda acc: 0)


def test_verdicts_read_off_intervals():
    assert verdict(Interval(0.1, 0.05, 0.15, 3)) == "holds"
    assert verdict(Interval(-0.1, -0.15, -0.05, 3)) == "does not hold"
    assert verdict(Interval(0.02, -0.01, 0.05, 3)) == "inconclusive"
    assert verdict(Interval(0.3, 0.15, 0.4, 3), above=0.1) == "holds"
    assert verdict(Interval(0.3, 0.05, 0.4, 3), above=0.1) == "inconclusive"
    assert verdict(Interval(0.01, -0.02, 0.03, 3), equivalence=0.05) == "holds"
    assert verdict(Interval(0.1, 0.06, 0.14, 3), equivalence=0.05) == "does not hold"
    assert verdict(Interval(0.04, 0.0, 0.08, 3), equivalence=0.05) == "inconclusive"
    assert combine(["holds", "holds"]) == "holds"
    assert combine(["does not hold", "does not hold"]) == "does not hold"
    assert combine(["holds", "does not hold"]) == "inconclusive"


def test_seed_interval_is_a_t_interval():
    iv = seed_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2) = 4.303: half width 4.303 / sqrt(3)
    assert iv.estimate == pytest.approx(2.0)
    assert iv.hi - iv.estimate == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)


# ----------------------------------------------------------------------------- the study's verdicts


def _row(variant, method, seed, ood, correct_ood, *, role=None, alpha=None, fix=None, id_acc=0.97, steps=None):
    role = role or ("teacher" if variant == "teacher" else "student")
    return {"id": f"{role}-{variant}-{method}-{alpha}-{fix}-{steps}-s{seed}", "role": role, "variant": variant,
            "method": method, "seed": seed, "alpha": alpha, "fix": fix, "steps": steps, "id_acc": id_acc,
            "ood_acc": ood, "worst_group_acc": ood / 2,
            "correct": {"id_test": "1" * 97 + "0" * 3, "ood_test": correct_ood}}


def _bits(rng, p, n=2000):
    return "".join("1" if x else "0" for x in rng.random(n) < p)


def _grid(cfg, ood, *, control=0.99, plain_id=0.97):
    """Rows for every model of ``cfg`` with OOD accuracy ``ood[(variant, method, alpha, fix)]`` (default 0.5)."""
    from circuitkd.run.plan import plan

    rng = np.random.default_rng(0)
    rows = []
    for job in plan(cfg):
        key = (job.variant, job.method, job.alpha, job.fix)
        p = control if job.variant == "control" else ood.get(key, 0.5)
        bits = _bits(rng, p)
        id_acc = control if job.variant == "control" else (plain_id if job.role == "teacher" else 0.95)
        rows.append(_row(job.variant, job.method, job.seed, bits.count("1") / len(bits), bits, role=job.role,
                         alpha=job.alpha, fix=job.fix, id_acc=id_acc, steps=job.steps))
    return rows


def test_study_verdicts_targets_and_banner(tmp_path):
    cfg = ExperimentCfg(methods=("reweight",), seeds=(0, 1, 2), alphas=(0.5,), fixes=("augment",), n_boot=300,
                        task_args={"n_train": 300, "n_id": 100, "n_ood": 2000})
    # The debiased teacher gains 30 points; its KD student keeps none of it; the fix wins 25 back.
    ood = {("teacher", "none", None, None): 0.45, ("teacher", "reweight", None, None): 0.75,
           ("kd", "none", 0.5, None): 0.45, ("kd", "reweight", 0.5, None): 0.45,
           ("fix", "reweight", 0.5, "augment"): 0.70,
           ("alone", "reweight", None, None): 0.70, ("debiased_kd", "reweight", 0.5, None): 0.70}
    s = summarise(cfg, _grid(cfg, ood))
    by_id = {f["id"]: f for f in s["findings"]}
    assert by_id["undermined_alpha0.5"]["verdict"] == "holds"
    assert by_id["fix_augment"]["verdict"] == "holds"
    assert by_id["kd_adds_little"]["verdict"] == "holds"
    kept = by_id["undermined_alpha0.5"]["per_method"]["reweight"]["kept"]
    assert kept["lo"] < kept["estimate"] < kept["hi"] and abs(kept["estimate"]) < 0.25
    assert s["targets_met"] and not s["banner"]
    md = render_summary(cfg, s)
    assert "**holds**" in md and "⚠" not in md
    # the debiased-teacher target shows each method's own ID and OOD gain, so its margin is visible
    import re
    target = next(t for t in s["targets"] if t["name"] == "debiased_teachers")
    assert re.search(r"\[reweight: ID 0\.970, OOD gain \+0\.(2[89]|3[01])\d, met on 3 of 3 seeds\]", target["message"]), \
        target["message"]

    # Nothing learned the control task: the run still summarises, and says so loudly.
    bad = summarise(cfg, _grid(cfg, ood, control=0.52))
    assert not bad["targets_met"]
    assert any("teacher control (no shortcut) ID 0.52 < 0.95: findings below are unreliable" in b
               for b in bad["banner"])
    assert "**⚠ teacher control" in render_summary(cfg, bad)

    # One seed: every verdict is inconclusive, and the banner says why.
    one = cfg.replace(seeds=(0,))
    s1 = summarise(one, _grid(one, ood))
    assert {f["verdict"] for f in s1["findings"]} == {"inconclusive (1 seed)"}
    assert any("1 seed" in b for b in s1["banner"])


def test_targets_count_the_seeds_each_one_holds_on_alone():
    """A target met on the mean but missed by one seed is reported as thin, with that seed's numbers;
    an accuracy on the line (float32 0.95) meets it."""
    cfg = ExperimentCfg(methods=("reweight", "poe"), seeds=(0, 1, 2), alphas=(0.5,), fixes=(), n_boot=100,
                        task_args={"n_train": 300, "n_id": 100, "n_ood": 2000})
    ood = {("teacher", "none", None, None): 0.45, ("teacher", "reweight", None, None): 0.75,
           ("teacher", "poe", None, None): 0.75}
    rows = _grid(cfg, ood)
    for r in rows:
        if r["variant"] == "control" and r["role"] == "teacher":
            r["id_acc"] = {0: 0.99, 1: 0.99, 2: 0.93}[r["seed"]]  # mean 0.97: met, but not by seed 2
            r["ood_acc"] = float(np.float32(380 / 400))  # 0.9499999881: on the 0.95 line, so met
        if r["variant"] == "teacher" and r["method"] == "poe" and r["seed"] == 1:
            r["ood_acc"] = r["ood_acc"] - 0.25  # this seed's gain falls under +0.20; the mean's does not
    s = summarise(cfg.replace(targets={"control_teacher_ood": 0.95}), rows)
    by = {t["name"]: t for t in s["targets"]}
    assert s["targets_met"] and not s["banner"]
    ctl = by["control_teacher_id"]
    assert (ctl["seeds_met"], ctl["n_seeds"]) == (2, 3) and ctl["per_seed"] == [0.99, 0.99, 0.93]
    assert by["control_teacher_ood"]["ok"] and by["control_teacher_ood"]["seeds_met"] == 3
    deb = by["debiased_teachers"]
    assert deb["seeds_met_by_method"] == {"reweight": 3, "poe": 2}
    assert len(deb["seed_misses"]["poe"]) == 1 and deb["seed_misses"]["poe"][0].startswith("seed 1: ID 0.970")
    thin = s["thin_targets"]
    assert len(thin) == 2, thin
    assert "teacher control (no shortcut) ID 0.970 ≥ 0.95 on the mean, but on only 2 of 3 seeds alone " \
           "(0.990, 0.990, 0.930)" in thin
    assert any(line.startswith("debiased teacher poe reaches its lines on the mean over seeds but on only 2 of 3 "
                               "seeds alone (seed 1: ID 0.970, OOD gain") for line in thin)
    md = render_summary(cfg, s)
    assert "| teacher control (no shortcut) ID ≥ 0.95 | 0.970 | yes | 2 of 3 |" in md
    assert "**Thin:** teacher control (no shortcut) ID 0.970" in md and "⚠" not in md


def test_thin_targets_reach_the_arms_table_and_the_report():
    """The side-by-side table and the HTML notice carry the per-seed counts of a thin target."""
    from circuitkd.run.arms import side_by_side
    from circuitkd.run.report import thin_html

    cfg = ExperimentCfg(methods=("reweight",), seeds=(0, 1), alphas=(0.5,), fixes=(), n_boot=100,
                        task_args={"n_train": 300, "n_id": 100, "n_ood": 2000})
    rows = _grid(cfg, {("teacher", "none", None, None): 0.45, ("teacher", "reweight", None, None): 0.75})
    for r in rows:
        if r["variant"] == "teacher" and r["method"] == "none":
            r["id_acc"] = {0: 0.99, 1: 0.94}[r["seed"]]
    s = summarise(cfg, rows)
    arm = {"config": cfg.to_dict(), "results": rows, "summary": s}
    md = "\n".join(side_by_side({"nli": arm}))
    assert "| plain teacher ID | 0.965 (≥ 0.95); 1 of 2 seeds alone |" in md
    assert "seeds met alone: reweight 2 of 2" in md
    assert "**Thin (nli):** plain teacher ID 0.965 ≥ 0.95 on the mean, but on only 1 of 2 seeds alone (0.990, 0.940)." in md
    page = thin_html({"summary": s}, "nli")
    assert "class='thin'" in page and "of the nli arm met on the mean" in page and "(0.990, 0.940)" in page
    assert thin_html({"summary": {**s, "thin_targets": []}}) == ""
