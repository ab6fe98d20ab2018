"""A self-contained HTML report of a run: results tables, findings in words, and every figure.

The page embeds plotly.js once (no network needed to open it) and each figure as a
plotly div; the robustness figures are rebuilt from ``results.json`` and the analysis
figures read from ``analysis/figures/*.json``, so the report can be regenerated from the
run folder alone (``circuitkd report RUN``).
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any, Optional

from circuitkd.errors import CircuitKDError

REPORT = "report.html"

#: The analysis figures of each teacher/student comparison, in reading order, with their captions.
FIGURE_TITLES = {
    "head_patching": "Head patching, teacher vs student",
    "attention_heatmaps": "Attention to shortcut tokens per head",
    "patterns": "A matched head pair's attention on one example",
    "matching": "Head matching",
    "cka": "Residual-stream CKA",
    "circuit": "Teacher vs student circuit",
    "faithfulness": "Circuit faithfulness",
}
FIGURE_ORDER = tuple(FIGURE_TITLES)

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1150px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { border-bottom: 2px solid #4c72b0; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .8em 0; font-size: 0.88em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f5f9; }
td:first-child, td:nth-child(2), th:first-child { text-align: left; }
.findings li { margin: .25em 0; }
.figure { margin: 1em 0; }
.meta { color: #666; font-size: 0.9em; }
code { background: #f4f4f4; padding: 1px 4px; border-radius: 3px; }
nav a { margin-right: 1em; }
a.see { font-size: 0.85em; white-space: nowrap; margin-left: .3em; }
.figure h4 { margin: .6em 0 0; color: #444; }
.banner { background: #fdecea; border: 2px solid #c44e52; padding: .6em 1em; margin: 1em 0; color: #8a1f1f; }
.thin { background: #fff6e0; border: 2px solid #c98a12; padding: .6em 1em; margin: 1em 0; color: #6b4a05; }
"""


def markdown_to_html(text: str) -> str:
    """The small markdown subset ``summary.md`` uses: headings, pipe tables, paragraphs, emphasis, code."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        s = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)
        return re.sub(r"\*([^*]+)\*", r"<i>\1</i>", s)

    while i < len(lines):
        line = lines[i].rstrip()
        if not line:
            i += 1
            continue
        heading = re.match(r"^(#{1,6})\s+(.*)$", line)
        if heading:
            level = min(6, len(heading.group(1)) + 1)  # the page's own h1 is the title
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
            i += 1
            continue
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
                    rows.append(cells)
                i += 1
            if rows:
                head = "".join(f"<th>{inline(c)}</th>" for c in rows[0])
                body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            continue
        if line.startswith(("- ", "* ")):
            items = []
            while i < len(lines) and lines[i].startswith(("- ", "* ")):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        para = [line]
        i += 1
        while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|", "- ", "* ")):
            para.append(lines[i].rstrip())
            i += 1
        out.append(f"<p>{inline(' '.join(para))}</p>")
    return "\n".join(out)


def _figure_html(fig, div_id: str) -> str:
    # "fig-" keeps figure ids apart from the section anchors plotly would otherwise draw into.
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{div_id}",
                       config={"displaylogo": False, "responsive": True})


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]+", "-", text).strip("-").lower()


def paper_findings(results: dict[str, Any], analysis: Optional[dict[str, Any]] = None) -> list[str]:
    """The paper's findings, one sentence each, with the verdict the run's intervals give (computed in
    :func:`circuitkd.run.summarise` and, for the mechanism, :func:`circuitkd.run.study.mechanism_finding`)."""
    from circuitkd.run.summary import finding_detail

    summary = results.get("summary", {})
    found = list(summary.get("findings", []))
    if analysis and analysis.get("mechanism_finding") and not any(f.get("id") == "mechanism" for f in found):
        found.append(analysis["mechanism_finding"])
    lines = []
    for f in found:
        detail = "; ".join(finding_detail(m, d) for m, d in f.get("per_method", {}).items())
        lines.append(f"{f['title']}: {f['verdict'].upper()}. Test: {f['test']}." + (f" Per method: {detail}." if detail
                                                                                      else ""))
    if analysis:
        for cmp in analysis.get("comparisons", [])[:1]:
            lines.append(f"Mechanism, seed {analysis.get('seeds', ['?'])[0]} ({cmp['what']}): "
                         + " ".join(cmp["findings"][:3]))
    return lines


def banner_html(results: dict[str, Any]) -> str:
    """A visible warning for every missed target (controls, teachers) or too few seeds; empty when all is well."""
    banner = results.get("summary", {}).get("banner", [])
    if not banner:
        return ""
    return ("<div class='banner'><b>⚠ The findings of this run are unreliable.</b><ul>" +
            "".join(f"<li>{html.escape(line)}</li>" for line in banner) + "</ul></div>")


def thin_html(results: dict[str, Any], arm: str = "") -> str:
    """A notice for every target met on the means over seeds but not on every seed alone; empty when none."""
    thin = results.get("summary", {}).get("thin_targets", [])
    if not thin:
        return ""
    where = f" of the {html.escape(arm)} arm" if arm else ""
    return (f"<div class='thin'><b>Targets{where} met on the mean over seeds, not on every seed.</b><ul>" +
            "".join(f"<li>{html.escape(line)}</li>" for line in thin) + "</ul></div>")


def figure_anchor(name: str, kind: str, prefix: str = "") -> str:
    """The page anchor of comparison ``name``'s figure ``kind`` (its captioned block); ``prefix``
    keeps two arms' comparisons of the same name apart on one page."""
    return f"{prefix}{_slug(name)}--{_slug(kind)}"


def mechanisms_html(analysis: dict[str, Any], fig_dir: Path, prefix: str = "") -> list[str]:
    """Per comparison: its findings, each linked to the figure that shows it, then the figures.

    ``analysis["comparisons"][i]["finding_figures"]`` names the figure kind of each finding
    (None: no figure shows it); analyses written before it existed get no links. ``prefix`` goes
    in front of every anchor and figure id (one page holding several runs).
    """
    import plotly.io as pio

    parts: list[str] = []
    for cmp in analysis["comparisons"]:
        name = cmp["name"]
        present = [k for k in FIGURE_ORDER if (fig_dir / f"{name}__{k}.json").exists()]
        parts.append(f"<h3 id='{prefix}{_slug(name)}'>{html.escape(cmp['what'])}</h3>")
        parts.append(f"<p class='meta'>teacher <code>{html.escape(cmp['teacher'])}</code> "
                     f"(OOD {100 * cmp['teacher_scores']['ood_acc']:.1f}%), student <code>{html.escape(cmp['student'])}"
                     f"</code> (OOD {100 * cmp['student_scores']['ood_acc']:.1f}%)</p>")
        kinds = cmp.get("finding_figures") or [None] * len(cmp["findings"])
        items = []
        for line, kind in zip(cmp["findings"], kinds):
            link = (f" <a class='see' href='#{figure_anchor(name, kind, prefix)}'>→ {html.escape(FIGURE_TITLES[kind].lower())}</a>"
                    if kind in present else "")
            items.append(f"<li>{html.escape(line)}{link}</li>")
        parts.append("<ul class='findings'>" + "".join(items) + "</ul>")
        parts.append("<details><summary>attention diff, in detail</summary><ul>" +
                     "".join(f"<li>{html.escape(x)}</li>" for x in cmp["attention_summary"]) + "</ul></details>")
        for kind in present:
            fig = pio.read_json(str(fig_dir / f"{name}__{kind}.json"))
            parts.append(f"<div class='figure' id='{figure_anchor(name, kind, prefix)}'><h4>"
                         f"{html.escape(FIGURE_TITLES[kind])}</h4>"
                         f"{_figure_html(fig, prefix + _slug(f'{name}__{kind}'))}</div>")
    return parts


def _page(parts: list[str]) -> str:
    import plotly.offline

    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>circuitkd report</title>"
            f"<style>{_CSS}</style><script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head>"
            "<body>" + "\n".join(parts) + "</body></html>")


def write_report(run_dir: str | Path, *, out: Optional[str | Path] = None) -> Path:
    """Write ``<run>/report.html`` (or ``out``) from the run folder; returns its path.

    A folder of the study's arms (``circuitkd run --arm all``: ``<run>/nli``, ``<run>/vision``)
    gets the side-by-side report of :func:`write_arms_report`.
    """
    from circuitkd.models.checkpoint import atomic_write_text

    run_dir = Path(run_dir)
    results_path = run_dir / "results.json"
    if not results_path.exists():
        from circuitkd.run.plan import ARMS

        if any((run_dir / arm / "results.json").is_file() for arm in ARMS):
            return write_arms_report(run_dir, out=out)
        raise CircuitKDError(f"{run_dir} is not a finished run folder (no results.json)")
    target = Path(out) if out is not None else run_dir / REPORT
    atomic_write_text(target, _page(run_parts(run_dir)))
    return target


def run_parts(run_dir: Path, prefix: str = "") -> list[str]:
    """The HTML blocks of one run's report (title, banner, findings, figures, mechanisms, tables);
    ``prefix`` keeps element ids unique on a page holding several runs."""
    from circuitkd.viz import robustness

    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text())
    rows = results["results"]
    analysis_path = run_dir / "analysis" / "analysis.json"
    analysis = json.loads(analysis_path.read_text()) if analysis_path.exists() else None
    cfg = results["config"]
    summary_md = (run_dir / "summary.md").read_text() if (run_dir / "summary.md").exists() else ""

    figures: list[tuple[str, str, Any]] = [
        ("robustness", "Robustness before and after KD", robustness.robustness_figure(rows)),
        ("per-bias", "Per bias type", robustness.per_bias_figure(rows)),
    ]
    if any(r.get("variant") == "fix" for r in rows):
        figures.append(("fixes", "The fixes", robustness.fixes_figure(rows)))
    budget = results.get("summary", {}).get("budget") or {}
    if budget.get("points"):
        figures.append(("budget", "Distillability against the student's budget", robustness.budget_figure(budget)))

    parts = [f"<h1>circuitkd report — run <code>{html.escape(cfg.get('name', run_dir.name))}</code></h1>",
             f"<p class='meta'>Run folder <code>{html.escape(str(run_dir))}</code>; task <code>{html.escape(cfg['task'])}</code>; "
             f"seeds {cfg['seeds']}; budgets: teachers {cfg['teacher_steps']} steps, students {cfg['student_steps']} "
             f"steps, batch {cfg['batch_size']}.</p>"]
    parts.append(banner_html(results))
    parts.append(thin_html(results))
    p = prefix
    nav = [f"<a href='#{p}findings'>Findings</a>", f"<a href='#{p}robustness'>Robustness</a>"]
    if analysis:
        nav.append(f"<a href='#{p}mechanisms'>Mechanisms</a>")
    nav.append(f"<a href='#{p}tables'>Tables</a>")
    parts.append("<nav>" + "".join(nav) + "</nav>")
    parts.append(f"<h2 id='{p}findings'>Findings</h2><ul class='findings'>" +
                 "".join(f"<li>{html.escape(line)}</li>" for line in paper_findings(results, analysis)) + "</ul>")
    parts.append(f"<h2 id='{p}robustness'>Robustness</h2>")
    for key, title, fig in figures:
        parts.append(f"<div class='figure'><h3>{html.escape(title)}</h3>{_figure_html(fig, p + key)}</div>")
    image_figures = image_figures_html(run_dir, p)
    if image_figures:
        parts.append(f"<h2 id='{p}image-attention'>Attention over the image</h2>")
        parts.extend(image_figures)
    if analysis:
        parts.append(f"<h2 id='{p}mechanisms'>Mechanisms: teacher vs student</h2>")
        parts.append(f"<p class='meta'>{analysis['n_pairs']} shortcut-conflict pairs (clean: shortcut absent or "
                     f"agreeing with the gold label; corrupt: one minimal edit makes it point elsewhere); metric: "
                     f"logit(gold) − logit(shortcut label); circuits by {html.escape(analysis['circuit_method'])} "
                     f"(top {analysis['top_k']} edges); attention on {analysis['n_attention']} OOD examples.</p>")
        parts.extend(mechanisms_html(analysis, run_dir / "analysis" / "figures", p))
    parts.append(f"<h2 id='{p}tables'>Tables</h2>")
    parts.append(markdown_to_html(summary_md))
    return parts


def image_figures_html(run_dir: Path, prefix: str = "") -> list[str]:
    """The image arm's attention maps over the picture (``<run>/image_analysis/figures/*.json``,
    written by :func:`circuitkd.image_mechanisms.analyse_images`); empty for other runs."""
    import plotly.io as pio

    fig_dir = Path(run_dir) / "image_analysis" / "figures"
    if not fig_dir.is_dir():
        return []
    meta_path = fig_dir.parent / "image_analysis.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    captions = meta.get("captions", {})
    parts = []
    if meta.get("lines"):
        parts.append("<p class='meta'>Which heads carry each shortcut: the heads whose clean output, patched into "
                     "the run where only that shortcut is flipped, restores most of logit(gold) − logit(shortcut's "
                     "label), with their attention from CLS to the shortcut's patches.</p><ul class='findings'>" +
                     "".join(f"<li>{html.escape(line)}</li>" for line in meta["lines"]) + "</ul>")
    for path in sorted(fig_dir.glob("*.json")):
        fig = pio.read_json(str(path))
        caption = captions.get(path.stem, path.stem.replace("__", ": ").replace("_", " "))
        parts.append(f"<div class='figure'><h3>{html.escape(caption)}</h3>"
                     f"{_figure_html(fig, prefix + _slug(path.stem))}</div>")
    return parts


def _demote(block: str) -> str:
    """Headings one level down, so that a run's report nests under an arm's heading."""
    for level in (5, 4, 3, 2):
        block = re.sub(rf"<(/?)h{level}\b", rf"<\g<1>h{level + 1}", block)
    return block


def write_arms_report(out_dir: str | Path, *, out: Optional[str | Path] = None) -> Path:
    """``<out_dir>/report.html`` for a folder of the study's arms: their setups, targets, verdicts and
    headline models side by side, then each arm's own report (figures, mechanisms, tables) in full."""
    from circuitkd.run.arms import arm_dirs, load_arm, side_by_side
    from circuitkd.models.checkpoint import atomic_write_text

    out_dir = Path(out_dir)
    dirs = arm_dirs(out_dir)
    arms = {a: load_arm(d) for a, d in dirs.items()}
    parts = [f"<h1>circuitkd report — the {' and '.join(dirs)} arms</h1>",
             f"<p class='meta'>Run folder <code>{html.escape(str(out_dir))}</code>; each arm is a full run folder "
             "(" + ", ".join(f"<code>{html.escape(a)}/</code>" for a in dirs) + ") with its own report.</p>"]
    parts.append("<nav>" + "".join(f"<a href='#arm-{a}'>Arm {html.escape(a)}</a>" for a in dirs) + "</nav>")
    for a in dirs:
        banner = banner_html(arms[a])
        if banner:
            parts.append(banner.replace("The findings of this run", f"The findings of the {html.escape(a)} arm"))
        parts.append(thin_html(arms[a], a))
    parts.append(markdown_to_html("\n".join(side_by_side(arms))))
    for a, d in dirs.items():
        parts.append(f"<h2 id='arm-{a}'>Arm <code>{html.escape(a)}</code></h2>")
        parts.extend(_demote(block) for block in run_parts(d, prefix=f"{a}-")[1:])
    target = Path(out) if out is not None else out_dir / REPORT
    atomic_write_text(target, _page(parts))
    return target
