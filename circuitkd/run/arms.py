"""The study's arms side by side: the NLI arm and the image arm, each a full run folder.

``circuitkd run`` (``--arm all``) runs the shipped config of each arm of
:data:`circuitkd.run.ARMS` through the same code path (grid, summary, intervals, verdicts,
analysis) into ``<out>/<arm>/``, then writes ``<out>/summary.md`` (this module) and
``<out>/report.html`` (:func:`circuitkd.run.report.write_arms_report`) that put the arms' targets,
verdicts and headline models next to each other. Each arm's own folder stays a complete run:
``circuitkd report <out>/nli`` rebuilds that arm's report alone.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from circuitkd.errors import CircuitKDError
from circuitkd.run.summary import _seeds_met, _table

SUMMARY = "summary.md"

#: The models the side-by-side table shows, as (method, label) keys of ``summary["models"]``.
HEADLINE_LABELS = ("teacher control (no shortcut)", "student control (no shortcut)", "teacher", "student alone",
                   "KD α=0", "KD α=0.5")


def arm_dirs(out: str | Path) -> dict[str, Path]:
    """The arms present under ``out`` (each a folder holding ``results.json``), in :data:`ARMS` order."""
    from circuitkd.run.plan import ARMS

    out = Path(out)
    found = {arm: out / arm for arm in ARMS if (out / arm / "results.json").is_file()}
    if not found:
        raise CircuitKDError(f"{out} holds no finished arm (no {'/results.json or '.join(ARMS)}/results.json)")
    return found


def load_arm(run_dir: Path) -> dict[str, Any]:
    """An arm's ``results.json`` (config, rows, summary)."""
    return json.loads((Path(run_dir) / "results.json").read_text())


def _value(values: list, scale: float = 100.0) -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    return f"{scale * sum(vals) / len(vals):.1f}"


def side_by_side(arms: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: the arms' setups, targets, verdicts and headline models in columns, one per arm."""
    names = list(arms)
    out: list[str] = []
    setup = []
    for label, get in (
        ("task", lambda r: f"`{r['config']['task']}`"),
        ("teacher / student", lambda r: " / ".join(_spec(r["config"], role) for role in ("teacher", "student"))),
        ("steps (teacher / student)", lambda r: f"{r['config']['teacher_steps']} / {r['config']['student_steps']}"),
        ("methods", lambda r: ", ".join(r["config"]["methods"])),
        ("fixes", lambda r: ", ".join(r["config"]["fixes"]) or "–"),
        ("seeds", lambda r: str(list(r["config"]["seeds"]))),
        ("models trained", lambda r: str(len(r["results"]))),
        ("wall time (grid)", lambda r: f"{r['summary'].get('wall_seconds', float('nan')) / 60:.1f} min"),
    ):
        setup.append([label, *[get(arms[a]) for a in names]])
    out += ["## The arms", "", _table(["", *names], setup), ""]

    targets: dict[str, dict[str, dict]] = {}
    for a in names:
        for t in arms[a]["summary"].get("targets", []):
            targets.setdefault(t["name"], {})[a] = t
    if targets:
        body = []
        for name, per_arm in targets.items():
            what = next(iter(per_arm.values()))["what"]  # each arm has its own threshold: shown in its cell
            cells = []
            for a in names:
                t = per_arm.get(a)
                if t is None:
                    cells.append("–")
                elif name == "debiased_teachers":
                    by_seed = _seeds_met(t)
                    cells.append(f"{t['value']} of {len(arms[a]['config']['methods'])} "
                                 f"({', '.join(t.get('methods') or []) or 'none'}){'' if t['ok'] else ' **missed**'}"
                                 + (f"; seeds met alone: {by_seed}" if by_seed != "–" else ""))
                else:
                    thin = "seeds_met" in t and t["seeds_met"] < t["n_seeds"]
                    cells.append(f"{t['value']:.3f} ({'≤' if t['at_most'] else '≥'} {t['target']:.2f})"
                                 f"{'' if t['ok'] else ' **missed**'}"
                                 + (f"; {_seeds_met(t)} seeds alone" if thin else ""))
            body.append([what, *cells])
        out += ["## Targets", "", _table(["target", *names], body), ""]
        for a in names:
            for line in arms[a]["summary"].get("thin_targets", []):
                out += [f"**Thin ({a}):** {line}.", ""]

    findings: dict[str, dict[str, dict]] = {}
    titles: dict[str, str] = {}
    for a in names:
        for f in arms[a]["summary"].get("findings", []):
            findings.setdefault(f["id"], {})[a] = f
            titles.setdefault(f["id"], f["title"])
    if findings:
        body = [[titles[fid], *[f"**{per_arm[a]['verdict']}**" if a in per_arm else "–" for a in names]]
                for fid, per_arm in findings.items()]
        out += ["## Findings (verdicts from each arm's intervals)", "", _table(["finding", *names], body), ""]

    rows = []
    for label in HEADLINE_LABELS:
        for method in _methods(arms):
            cells, seen = [], False
            for a in names:
                entry = arms[a]["summary"].get("models", {}).get(f"{method} | {label}")
                if entry is None:
                    cells += ["–", "–"]
                    continue
                seen = True
                ci = entry.get("ci", {}).get("ood_acc")
                ood = _value(entry["values"]["ood_acc"]) if not ci else _fmt_ci(ci)
                cells += [_value(entry["values"]["id_acc"]), ood]
            if seen:
                rows.append([method, label, *cells])
    if rows:
        header = ["method", "model"] + [f"{a} {m}" for a in names for m in ("ID", "OOD [95% interval]")]
        out += ["## Headline models (accuracy %, mean over seeds)", "", _table(header, rows), ""]
    return out


def _fmt_ci(ci: dict) -> str:
    from circuitkd.stats import Interval

    return Interval(**ci).fmt(100.0, 1)


def _methods(arms: dict[str, dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {"none": None}
    for r in arms.values():
        seen.update(dict.fromkeys(r["config"]["methods"]))
    return list(seen)


def _spec(config: dict, role: str) -> str:
    from circuitkd.config import ExperimentCfg

    spec = ExperimentCfg.from_dict(config).model_spec(role)
    backbone = "ViT" if spec.backbone == "vit" or config["task"] in ("colored_mnist", "shortcut_mnist") else spec.backbone
    return f"{backbone} {spec.n_layers}L d={spec.d_model}"


def render_arms_summary(out: str | Path) -> str:
    """``<out>/summary.md``: the arms side by side, then each arm's own summary in full."""
    dirs = arm_dirs(out)
    arms = {a: load_arm(d) for a, d in dirs.items()}
    lines = [f"# circuitkd study: {' and '.join(dirs)} arms", "",
             "Each arm is a full run folder (" + ", ".join(f"`{a}/`" for a in dirs) + ") with its own results, "
             "summary, analysis and report; this page puts them side by side.", ""]
    lines += side_by_side(arms)
    for a, d in dirs.items():
        image = d / "image_analysis" / "image_analysis.json"
        if image.is_file():
            lines += [f"## Which heads carry each shortcut (arm `{a}`)", "",
                      "Per model: the heads whose clean output, patched into the run where only that shortcut is "
                      "flipped, restores most of logit(gold) − logit(shortcut's label) (effect in logits), and their "
                      "attention from CLS to the shortcut's patches.", ""]
            lines += [f"- {line}" for line in json.loads(image.read_text()).get("lines", [])] + [""]
    for a, d in dirs.items():
        own = (d / SUMMARY).read_text() if (d / SUMMARY).is_file() else ""
        lines += [f"## Arm `{a}` in full ({a}/summary.md)", ""]
        # Demote the arm's headings one level so they nest under this page's.
        lines += [("#" + line) if line.startswith("#") else line for line in own.splitlines()]
        lines.append("")
    return "\n".join(lines)


def write_arms_summary(out: str | Path) -> Path:
    """Write ``<out>/summary.md`` for the arms under ``out``; returns its path."""
    from circuitkd.models.checkpoint import atomic_write_text

    target = Path(out) / SUMMARY
    atomic_write_text(target, render_arms_summary(out))
    return target
