"""The study's summary: per-model means over seeds, the paper's four findings with bootstrap intervals
and verdicts computed by code, targets, the budget sweep, and the markdown of ``summary.md``."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

from circuitkd.config import ExperimentCfg
from circuitkd.stats import NAN_INTERVAL, Interval, bootstrap_interval, combine, verdict
from circuitkd.stats import mean_std
from circuitkd.run.jobs import _where
from circuitkd.run.plan import _fmt_alpha
from circuitkd.run.tasks import control_task_args, load_task


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
    banner = _missed(targets)
    thin = _thin_targets(targets)
    if n_seeds < 2:
        banner.append(f"only {n_seeds} seed: every verdict is inconclusive (1 seed); run two or more")
    return {"metrics": metrics, "models": models, "distillability": distill, "kd_contribution": contribution,
            "fix_effect": fixes, "budget": budget, "targets": targets,
            "targets_met": all(t["ok"] for t in targets), "banner": banner, "thin_targets": thin, "findings": findings,
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
    """Each accuracy target of :data:`circuitkd.config.DEFAULT_TARGETS` against this run's means over seeds.

    A target is met (``ok``) on the means over seeds; each entry also says on how many seeds it holds
    alone (``seeds_met`` of ``n_seeds``, values in ``per_seed``), so a mean that clears its line on the
    strength of some seeds and not others is visible (:func:`_thin_targets`).
    """
    out: list[dict[str, Any]] = []

    def meets(value: float, target: float, at_most: bool = False) -> bool:
        # accuracies are stored as float32 (380/400 reads 0.9499999881), so a value on the line meets it
        return (value <= target + _LINE_EPS) if at_most else (value >= target - _LINE_EPS)

    def check(name: str, what: str, key: tuple, metric: str, target: float, at_most: bool = False) -> None:
        per_seed = grid.values(key, metric)
        value = mean_std(per_seed)[0]
        ok = meets(value, target, at_most) and not math.isnan(value)
        sign = "≤" if at_most else "≥"
        message = (f"{what} {value:.2f} {'>' if at_most else '<'} {target:.2f}: findings below are unreliable"
                   if not ok else f"{what} {value:.2f} {sign} {target:.2f}")
        seeds_met = sum(meets(v, target, at_most) for v in per_seed)
        out.append({"name": name, "what": what, "value": value, "target": target, "at_most": at_most, "ok": ok,
                    "message": message, "per_seed": per_seed, "seeds_met": seeds_met, "n_seeds": len(per_seed)})

    if cfg.controls and control_task_args(cfg) is not None:
        for role in ("teacher", "student"):
            key = grid.key("control", "none", role=role)
            for split in ("id", "ood"):
                check(f"control_{role}_{split}", f"{role} control (no shortcut) {split.upper()}", key,
                      f"{split}_acc", cfg.target(f"control_{role}_{split}"))
    plain = grid.key("teacher", "none")
    plain_ood = grid.mean(plain, "ood_acc")
    check("plain_teacher_id", "plain teacher ID", plain, "id_acc", cfg.target("plain_teacher_id"))
    check("plain_teacher_ood_max", "plain teacher OOD", plain, "ood_acc", cfg.target("plain_teacher_ood_max"),
          at_most=True)
    if cfg.methods:
        id_line, gain_line = cfg.target("debiased_teacher_id"), cfg.target("debiased_teacher_ood_gain")
        # each method's (ID, OOD gain over the plain teacher), means over seeds
        means = {m: (grid.mean(grid.key("teacher", m), "id_acc"), grid.mean(grid.key("teacher", m), "ood_acc"))
                 for m in cfg.methods}
        good = [m for m, (id_acc, ood) in means.items() if meets(id_acc, id_line) and meets(ood - plain_ood, gain_line)]
        # the same test seed by seed, each method against the plain teacher of its own seed
        plain_by_seed = {s: r["ood_acc"] for s, r in grid.by.get(plain, {}).items()}
        per_seed: dict[str, list[bool]] = {}
        misses: dict[str, list[str]] = {}
        for m in cfg.methods:
            per_seed[m], misses[m] = [], []
            for s, r in sorted(grid.by.get(grid.key("teacher", m), {}).items()):
                if s not in plain_by_seed:
                    continue
                gain = r["ood_acc"] - plain_by_seed[s]
                per_seed[m].append(meets(r["id_acc"], id_line) and meets(gain, gain_line))
                if not per_seed[m][-1]:
                    misses[m].append(f"seed {s}: ID {r['id_acc']:.3f}, OOD gain {gain:+.3f}")
        need = min(2, len(cfg.methods))
        # Each method's own numbers, so a reader sees how far above (or below) the lines it is.
        margins = "; ".join(f"{m}: ID {id_acc:.3f}, OOD gain {ood - plain_ood:+.3f}, "
                            f"met on {sum(per_seed[m])} of {len(per_seed[m])} seeds"
                            for m, (id_acc, ood) in means.items())
        ok = len(good) >= need
        out.append({"name": "debiased_teachers", "what": "debiased teachers", "value": len(good), "target": need,
                    "at_most": False, "ok": ok, "methods": good,
                    "seeds_met_by_method": {m: sum(v) for m, v in per_seed.items()},
                    "n_seeds_by_method": {m: len(v) for m, v in per_seed.items()}, "seed_misses": misses,
                    "message": (f"{len(good)} of {len(cfg.methods)} debiased teachers reach ID ≥ "
                                f"{id_line:.2f} and OOD ≥ plain + {gain_line:.2f} ({', '.join(good) or 'none'}); "
                                f"need {need}" + ("" if ok else ": findings below are unreliable")
                                + f" [{margins}]")})
    return out


def _missed(targets: list[dict[str, Any]]) -> list[str]:
    """The message of every target missed on the means over seeds (the run's banner lines)."""
    return [t["message"] for t in targets if not t["ok"]]


#: Slack when a value is compared with its target line: float32 rounding of an accuracy on the line.
_LINE_EPS = 1e-6


def _thin_targets(targets: list[dict[str, Any]]) -> list[str]:
    """One line per target met on the means over seeds but not on every seed alone (for a debiased
    teacher: a method counted as reaching its lines that misses them on some seed)."""
    lines = []
    for t in targets:
        if not t["ok"]:
            continue
        if t["name"] == "debiased_teachers":
            for m in t["methods"]:
                k, n = t["seeds_met_by_method"][m], t["n_seeds_by_method"][m]
                if k < n:
                    why = "; ".join(t.get("seed_misses", {}).get(m, []))
                    lines.append(f"debiased teacher {m} reaches its lines on the mean over seeds but on only "
                                 f"{k} of {n} seeds alone" + (f" ({why})" if why else ""))
        elif t["seeds_met"] < t["n_seeds"]:
            vals = ", ".join(f"{v:.3f}" for v in t["per_seed"])
            lines.append(f"{t['what']} {t['value']:.3f} {'≤' if t['at_most'] else '≥'} {t['target']:.2f} on the mean, "
                         f"but on only {t['seeds_met']} of {t['n_seeds']} seeds alone ({vals})")
    return lines


def _seeds_met(t: dict[str, Any]) -> str:
    """``"k of n"`` seeds on which target ``t`` holds alone (per method for the debiased teachers)."""
    if t["name"] == "debiased_teachers":
        return ", ".join(f"{m} {k} of {t.get('n_seeds_by_method', {}).get(m, '?')}"
                         for m, k in t.get("seeds_met_by_method", {}).items()) or "–"
    return f"{t['seeds_met']} of {t['n_seeds']}" if "seeds_met" in t else "–"


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
        f"{cfg.student_steps} steps, batch {cfg.batch_size}, lr {cfg.lr}, weight decay {cfg.weight_decay}; "
        f"KD temperature {cfg.temperature}; "
        f"seeds {list(cfg.seeds)}. Accuracies in %; mean ± std over seeds, and 95% intervals [lo, hi] from a "
        f"bootstrap over seeds and test examples ({cfg.n_boot} resamples).")
    if "wall_seconds" in summary:
        out.append(f"\nWall time: {summary['wall_seconds']:.0f} s ({summary['wall_seconds'] / 60:.1f} min) with "
                   f"{_where(cfg)}; summed training time {summary.get('train_seconds', 0):.0f} s.")
    if summary.get("targets"):
        out += ["", "## Targets", "", "Controls train the same models on the task with every shortcut uncorrelated "
                "with the label. Means over seeds.", ""]
        out.append(_table(["target", "value", "met", "seeds met alone"], [
            [t["what"] if t["name"] == "debiased_teachers" else f"{t['what']} {'≤' if t['at_most'] else '≥'} "
             f"{t['target']:.2f}", t["message"] if t["name"] == "debiased_teachers" else f"{t['value']:.3f}",
             "yes" if t["ok"] else "**no**", _seeds_met(t)] for t in summary["targets"]]))
        for line in summary.get("thin_targets", []):
            out += ["", f"**Thin:** {line}."]
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

