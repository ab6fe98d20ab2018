"""Figures for attention-pattern diffs (:class:`circuitkd.attention.AttentionDiff`).

Each function takes a computed diff and returns a ``plotly.graph_objects.Figure``; none
shows it or touches plotly's global templates.

- :func:`pattern_figure`: a teacher head's and a student head's pattern side by side on one
  example, shortcut tokens marked;
- :func:`shortcut_heatmaps`: layer × head shortcut attention of each model and the change
  per matched head;
- :func:`matching_figure`: the head matching as a bipartite plot;
- :func:`cka_figure`: the layer-by-layer CKA matrix.
"""
from __future__ import annotations

from typing import Optional

import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from circuitkd.attention import SHORTCUT, AttentionDiff, head_name
from circuitkd.errors import CircuitKDError

_MARK = "#d62728"


def _pair_with_largest_change(diff: AttentionDiff) -> tuple[tuple[int, int], tuple[int, int]]:
    if not diff.matching:
        raise CircuitKDError("the diff has no matched heads")
    i = int(diff.shortcut_change.abs().argmax())
    student, teacher, _ = diff.matching[i]
    return teacher, student


def _check_head(name: str, head: tuple[int, int], layers: int, heads: int) -> None:
    layer, h = head
    if not (0 <= layer < layers and 0 <= h < heads):
        raise CircuitKDError(f"{name} head {head_name(layer, h)} does not exist: the {name} has {layers} layers "
                             f"of {heads} heads")


def pattern_figure(diff: AttentionDiff, teacher_head: Optional[tuple[int, int]] = None,
                   student_head: Optional[tuple[int, int]] = None) -> go.Figure:
    """Teacher and student attention patterns on the diff's example, shortcut tokens outlined.

    ``teacher_head`` / ``student_head``: ``(layer, head)``; by default the matched pair whose
    shortcut attention changed most.
    """
    ex = diff.example
    if ex is None:
        raise CircuitKDError("the diff carries no example patterns")
    default_t, default_s = _pair_with_largest_change(diff)
    teacher_head = teacher_head or default_t
    student_head = student_head or default_s
    _check_head("teacher", teacher_head, ex.teacher.shape[0], ex.teacher.shape[1])
    _check_head("student", student_head, ex.student.shape[0], ex.student.shape[1])
    labels = [f"<b>*{lab}</b>" if j in ex.shortcut_positions else lab for j, lab in enumerate(ex.labels)]
    ticks = list(range(ex.length))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
        f"teacher {head_name(*teacher_head)}", f"student {head_name(*student_head)}"))
    for col, (pattern, head) in enumerate(((ex.teacher, teacher_head), (ex.student, student_head)), start=1):
        fig.add_trace(go.Heatmap(
            z=pattern[head[0], head[1]].tolist(), x=ticks, y=ticks, zmin=0, zmax=1, colorscale="Blues",
            showscale=col == 2, colorbar=dict(title="attention"),
            hovertemplate="dest %{y}<br>src %{x}<br>attention %{z:.3f}<extra></extra>"), row=1, col=col)
        for j in ex.shortcut_positions:
            fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=-0.5, y1=ex.length - 0.5,
                          line=dict(color=_MARK, width=2), row=1, col=col)
        axis = dict(tickmode="array", tickvals=ticks, ticktext=labels, tickfont=dict(size=9))
        fig.update_xaxes(title_text="source (key)", tickangle=-60, row=1, col=col, **axis)
        fig.update_yaxes(title_text="destination (query)" if col == 1 else None, autorange="reversed",
                         row=1, col=col, **axis)
    fig.update_layout(title=f"Attention on example {ex.index} (shortcut tokens outlined: "
                            f"{', '.join(diff.shortcut)})", height=520, width=1050)
    return fig


def shortcut_heatmaps(diff: AttentionDiff, cls: str = SHORTCUT, *, source: str = "read") -> go.Figure:
    """Layer × head attention to ``cls`` for teacher and student, and student − matched teacher.

    The third panel is on the student's grid: each student head minus the teacher head it
    was matched to (blank where a student head is unmatched).
    """
    t = diff.teacher.shortcut_attention(cls, source=source)
    s = diff.student.shortcut_attention(cls, source=source)
    change = [[None] * s.shape[1] for _ in range(s.shape[0])]
    partner = [[""] * s.shape[1] for _ in range(s.shape[0])]
    for (sl, sh), (tl, th), _ in diff.matching:
        change[sl][sh] = float(s[sl, sh] - t[tl, th])
        partner[sl][sh] = head_name(tl, th)
    finite = [abs(v) for row in change for v in row if v is not None]
    span = max(finite) if finite else 1.0
    vmax = float(max(t.nan_to_num(0).max(), s.nan_to_num(0).max(), 1e-9))
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.12, subplot_titles=(
        "teacher", "student", "student − matched teacher"))
    bar_x = fig.layout.xaxis2.domain[1] + 0.01  # the shared attention scale sits right of the student panel
    what = "from CLS" if source == "read" else "from every position"
    for col, table in ((1, t), (2, s)):
        fig.add_trace(go.Heatmap(
            z=table.tolist(), zmin=0, zmax=vmax, colorscale="Viridis", showscale=col == 2,
            colorbar=dict(title="mass", x=bar_x, len=0.9),
            hovertemplate="head %{y}.%{x}<br>attention %{z:.3f}<extra></extra>"), row=1, col=col)
    fig.add_trace(go.Heatmap(
        z=change, customdata=partner, zmid=0, zmin=-span, zmax=span, colorscale="RdBu_r",
        colorbar=dict(title="Δ", x=1.01, len=0.9),
        hovertemplate="student %{y}.%{x} vs teacher %{customdata}<br>Δ %{z:+.3f}<extra></extra>"), row=1, col=3)
    for col in (1, 2, 3):
        fig.update_xaxes(title_text="head", dtick=1, row=1, col=col)
        fig.update_yaxes(title_text="layer" if col == 1 else None, dtick=1, autorange="reversed", row=1, col=col)
    fig.update_layout(title=f"Attention to {cls} tokens {what}<br><sup>matching: {diff.matching_method}</sup>",
                      height=380, width=1100)
    return fig


def matching_figure(diff: AttentionDiff) -> go.Figure:
    """The head matching as a bipartite graph: teacher heads left, student heads right.

    Edge colour: pattern similarity; node colour: shortcut attention; hover: the change in
    shortcut attention per matched pair.
    """
    t_att, s_att = diff.teacher.shortcut_attention(), diff.student.shortcut_attention()
    Lt, Ht = t_att.shape
    Ls, Hs = s_att.shape
    n_t, n_s = Lt * Ht, Ls * Hs
    # both columns span [0, 1] top to bottom so that models of different size line up by depth
    y_t = {(la, h): 1 - (la * Ht + h) / max(n_t - 1, 1) for la in range(Lt) for h in range(Ht)}
    y_s = {(la, h): 1 - (la * Hs + h) / max(n_s - 1, 1) for la in range(Ls) for h in range(Hs)}
    fig = go.Figure()
    sims = [m[2] for m in diff.matching]
    lo, hi = (min(sims), max(sims)) if sims else (0.0, 1.0)
    for i, (s, t, sim) in enumerate(diff.matching):
        frac = 0.5 if hi == lo else (sim - lo) / (hi - lo)
        fig.add_trace(go.Scatter(
            x=[0, 1], y=[y_t[t], y_s[s]], mode="lines", showlegend=False,
            line=dict(color=sample_colorscale("Plasma", [frac])[0], width=1 + 4 * frac),
            hovertemplate=(f"teacher {head_name(*t)} ↔ student {head_name(*s)}<br>similarity {sim:.3f}<br>"
                           f"shortcut attention Δ {float(diff.shortcut_change[i]):+.3f}<extra></extra>")))
    vmax = float(max(t_att.nan_to_num(0).max(), s_att.nan_to_num(0).max(), 1e-9))
    for x, ys, att, who in ((0, y_t, t_att, "teacher"), (1, y_s, s_att, "student")):
        heads = list(ys)
        fig.add_trace(go.Scatter(
            x=[x] * len(heads), y=[ys[h] for h in heads], mode="markers+text", name=who,
            text=[head_name(*h) for h in heads], textposition="middle left" if x == 0 else "middle right",
            marker=dict(size=14, color=[float(att[h]) for h in heads], colorscale="Viridis", cmin=0, cmax=vmax,
                        showscale=x == 1, colorbar=dict(title="shortcut<br>attention"),
                        line=dict(color="black", width=1)),
            hovertemplate=f"{who} %{{text}}<br>shortcut attention %{{marker.color:.3f}}<extra></extra>"))
    fig.update_xaxes(range=[-0.4, 1.4], tickvals=[0, 1], ticktext=["teacher", "student"], showgrid=False)
    fig.update_yaxes(visible=False, range=[-0.08, 1.08])
    fig.update_layout(title=f"Head matching by {'1 − JS/ln2' if diff.similarity_kind == 'js' else 'pattern correlation'}"
                            f"<br><sup>{diff.matching_method}</sup>",
                      height=max(420, 22 * max(n_t, n_s)), width=700, showlegend=False)
    return fig


def cka_figure(diff: AttentionDiff) -> go.Figure:
    """Linear CKA between each student layer's and each teacher layer's residual stream."""
    cka = diff.cka
    fig = go.Figure(go.Heatmap(
        z=cka.tolist(), x=[f"T{j}" for j in range(cka.shape[1])], y=[f"S{i}" for i in range(cka.shape[0])],
        zmin=0, zmax=1, colorscale="Viridis", colorbar=dict(title="CKA"),
        text=[[f"{float(v):.2f}" for v in row] for row in cka], texttemplate="%{text}",
        hovertemplate="student %{y} / teacher %{x}<br>CKA %{z:.3f}<extra></extra>"))
    fig.update_xaxes(title_text="teacher layer (residual after block)")
    fig.update_yaxes(title_text="student layer", autorange="reversed")
    fig.update_layout(title="Linear CKA of residual streams (Kornblith et al. 2019)", height=360,
                      width=160 + 90 * cka.shape[1])
    return fig


def attention_figures(diff: AttentionDiff) -> dict[str, go.Figure]:
    """Every figure for a diff, by name (``patterns``, ``shortcut``, ``matching``, ``cka``)."""
    return {"patterns": pattern_figure(diff), "shortcut": shortcut_heatmaps(diff),
            "matching": matching_figure(diff), "cka": cka_figure(diff)}
