"""Figures for the robustness half: teachers vs students per debiasing method and bias type, and the fixes.

Each builder takes the rows of a run's ``results.json`` (one per model and seed) and shows
mean ± std over seeds.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuitkd.stats import mean_std

_PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def _rows(rows: Sequence[dict], **match: Any) -> list[dict]:
    """Rows matching ``match``; students of the budget sweep only where ``sweep=True`` is asked for."""
    match.setdefault("sweep", False)
    return [r for r in rows if all(r.get(k, False if k == "sweep" else None) == v for k, v in match.items())]


def budget_figure(budget: dict) -> go.Figure:
    """Kept fraction of the teacher's OOD gain (95% interval) against the student's training budget.

    ``budget`` is ``summary["budget"]`` of a run: ``method``, ``alpha`` and ``points`` with
    ``steps`` and ``kept`` (an interval dict with ``estimate``, ``lo``, ``hi``).
    """
    points = budget.get("points", [])
    steps = [p["steps"] for p in points]
    kept = [p["kept"]["estimate"] for p in points]
    # no bar where the interval is undefined (one seed, or a teacher gain of 0 in some resamples)
    up = [p["kept"]["hi"] - p["kept"]["estimate"] if math.isfinite(p["kept"]["hi"]) else 0 for p in points]
    down = [p["kept"]["estimate"] - p["kept"]["lo"] if math.isfinite(p["kept"]["lo"]) else 0 for p in points]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=steps, y=kept, mode="lines+markers", name=f"{budget.get('method')} teacher → student",
                             error_y=dict(type="data", array=up, arrayminus=down, symmetric=False),
                             marker_color=_PALETTE[0]))
    fig.add_hline(y=1.0, line_dash="dot", line_color="#888", annotation_text="keeps all of the teacher's gain")
    fig.add_hline(y=0.0, line_dash="dot", line_color="#c44e52", annotation_text="keeps none")
    fig.update_xaxes(title_text="student training steps", type="log", tickvals=steps)
    fig.update_yaxes(title_text="kept fraction of the teacher's OOD gain")
    fig.update_layout(title=f"Distillability against the student's budget (KD α={budget.get('alpha', 0):g}; "
                            "95% bootstrap intervals)", height=420, width=800)
    return fig


def _methods(rows: Sequence[dict]) -> list[str]:
    methods = []
    for r in rows:
        if r["role"] == "teacher" and r["method"] not in methods:
            methods.append(r["method"])
    return methods


def _kd_alphas(rows: Sequence[dict]) -> list[float]:
    return sorted({r["alpha"] for r in rows if r.get("variant") == "kd" and r.get("alpha") is not None})


def _series(rows: Sequence[dict], alphas: Sequence[float] | None, alone: bool) -> list[tuple[str, dict]]:
    alphas = _kd_alphas(rows) if alphas is None else alphas
    out = [("teacher", dict(role="teacher", variant="teacher"))]
    out += [(f"KD student (α={a:g}{', pure KD' if a == 0 else ''})", dict(variant="kd", alpha=a)) for a in alphas]
    if alone:
        out.append(("student alone", dict(variant="alone")))
    return out


def robustness_figure(rows: Sequence[dict], *, metrics: Sequence[str] = ("ood_acc", "worst_group_acc"),
                      alphas: Sequence[float] | None = None) -> go.Figure:
    """Teacher vs its KD students (each alpha) vs the student trained alone, per debiasing method (mean ± std)."""
    methods = _methods(rows)
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[_label(m) for m in metrics])
    series = _series(rows, alphas, alone=True)
    for col, metric in enumerate(metrics, start=1):
        for i, (name, match) in enumerate(series):
            means, stds = [], []
            for m in methods:
                mean, std = mean_std([100 * r[metric] for r in _rows(rows, method=m, **match)])
                means.append(mean)
                stds.append(std)
            fig.add_trace(go.Bar(name=name, x=methods, y=means, error_y=dict(type="data", array=stds),
                                 marker_color=_PALETTE[i], showlegend=col == 1, legendgroup=name), row=1, col=col)
        fig.update_yaxes(title_text="accuracy (%)", row=1, col=col, rangemode="tozero")
    fig.update_layout(barmode="group", title="Robustness before and after KD, per debiasing method",
                      height=420, width=1000)
    return fig


def per_bias_figure(rows: Sequence[dict], *, alphas: Sequence[float] | None = None) -> go.Figure:
    """OOD accuracy on each bias type's conflicting examples: teacher vs KD students, per method."""
    methods = _methods(rows)
    series = _series(rows, alphas, alone=False)
    biases = sorted({k[len("ood_acc["):-1] for r in rows for k in r if k.startswith("ood_acc[")})
    fig = make_subplots(rows=1, cols=max(1, len(biases)), subplot_titles=[f"bias: {b}" for b in biases])
    for col, bias in enumerate(biases, start=1):
        key = f"ood_acc[{bias}]"
        for i, (name, match) in enumerate(series):
            stats = [mean_std([100 * r[key] for r in _rows(rows, method=m, **match) if key in r]) for m in methods]
            fig.add_trace(go.Bar(name=name, x=methods, y=[s[0] for s in stats],
                                 error_y=dict(type="data", array=[s[1] for s in stats]),
                                 marker_color=_PALETTE[i], showlegend=col == 1, legendgroup=name), row=1, col=col)
        fig.update_yaxes(title_text="OOD accuracy (%)" if col == 1 else None, row=1, col=col, rangemode="tozero")
    fig.update_layout(barmode="group", title="Per bias type: accuracy where that shortcut conflicts (OOD)",
                      height=420, width=1100)
    return fig


def fixes_figure(rows: Sequence[dict], *, metrics: Sequence[str] = ("ood_acc", "worst_group_acc")) -> go.Figure:
    """Each fix's student against the plain KD student of the same teacher (bars, mean ± std)."""
    fixes = []
    for r in rows:
        if r.get("variant") == "fix" and r["fix"] not in fixes:
            fixes.append(r["fix"])
    methods = [m for m in _methods(rows) if _rows(rows, variant="fix", method=m)]
    fix_alpha = next((r["alpha"] for r in rows if r.get("variant") == "fix"), None)
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[_label(m) for m in metrics])
    labels = [f"KD (α={fix_alpha:g})" if fix_alpha is not None else "KD"] + [f"+{f}" for f in fixes]
    for col, metric in enumerate(metrics, start=1):
        for i, m in enumerate(methods):
            stats = [mean_std([100 * r[metric] for r in _rows(rows, variant="kd", alpha=fix_alpha, method=m)])]
            stats += [mean_std([100 * r[metric] for r in _rows(rows, variant="fix", fix=f, method=m)]) for f in fixes]
            fig.add_trace(go.Bar(name=f"{m} teacher", x=labels, y=[s[0] for s in stats],
                                 error_y=dict(type="data", array=[s[1] for s in stats]),
                                 marker_color=_PALETTE[i % len(_PALETTE)], showlegend=col == 1, legendgroup=m),
                          row=1, col=col)
        fig.update_yaxes(title_text="accuracy (%)", row=1, col=col, rangemode="tozero")
    fig.update_layout(barmode="group", title="The three fixes: student accuracy by how it was distilled",
                      height=420, width=1000)
    return fig


def _label(metric: str) -> str:
    return {"ood_acc": "OOD accuracy", "worst_group_acc": "worst-group accuracy", "id_acc": "ID accuracy"}.get(metric, metric)
