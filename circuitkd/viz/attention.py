"""Figures for attention-pattern diffs (:class:`circuitkd.attention.AttentionDiff`).

Each function takes a computed diff and returns a ``plotly.graph_objects.Figure``; none
shows it or touches plotly's global templates.

- :func:`pattern_figure`: a matched teacher head's and student head's attention side by side on
  one example, shortcut tokens marked (text: tokens on both axes and the read-out row as bars;
  images: the read-out attention over the picture's patches);
- :func:`shortcut_heatmaps`: layer × head shortcut attention of each model and the change
  per matched head;
- :func:`matching_figure`: the head matching as a bipartite plot;
- :func:`cka_figure`: the layer-by-layer CKA matrix.
"""
from __future__ import annotations

import html
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
    teacher, student, _ = diff.matching[i]
    return teacher, student


def _check_head(name: str, head: tuple[int, int], layers: int, heads: int) -> None:
    layer, h = head
    if not (0 <= layer < layers and 0 <= h < heads):
        raise CircuitKDError(f"{name} head {head_name(layer, h)} does not exist: the {name} has {layers} layers "
                             f"of {heads} heads")


def choose_pair(diff: AttentionDiff, teacher_head: Optional[tuple[int, int]] = None,
                student_head: Optional[tuple[int, int]] = None
                ) -> tuple[tuple[int, int], tuple[int, int], Optional[float]]:
    """``(teacher head, student head, similarity)`` to show: the matched pair whose shortcut
    attention changed most by default; the partner of the one head given; or both as given
    (similarity None when they are not matched to each other)."""
    if teacher_head is None and student_head is None:
        teacher_head, student_head = _pair_with_largest_change(diff)
    elif teacher_head is None:
        mates = [t for t, s, _ in diff.matching if s == tuple(student_head)]
        if not mates:
            raise CircuitKDError(f"student head {head_name(*student_head)} is matched to no teacher head; "
                                 "pass teacher_head too")
        teacher_head = mates[0]
    elif student_head is None:
        mates = [s for t, s, _ in diff.matching if t == tuple(teacher_head)]
        if not mates:
            raise CircuitKDError(f"teacher head {head_name(*teacher_head)} is matched to no student head "
                                 f"({diff.matching_method}); pass student_head too")
        student_head = mates[0]
    teacher_head, student_head = tuple(teacher_head), tuple(student_head)
    sim = [m for t, s, m in diff.matching if s == student_head and t == teacher_head]
    return teacher_head, student_head, (float(sim[0]) if sim else None)


def _tick(label: str, shortcut: bool) -> str:
    label = html.escape(label)
    return f"<span style='color:{_MARK}'><b>{label}</b></span>" if shortcut else label


def pattern_figure(diff: AttentionDiff, teacher_head: Optional[tuple[int, int]] = None,
                   student_head: Optional[tuple[int, int]] = None) -> go.Figure:
    """A matched teacher head's and student head's attention on the diff's example, side by side.

    ``teacher_head`` / ``student_head``: ``(layer, head)``; by default the matched pair whose
    shortcut attention changed most; give one and its matched partner is used.

    Text: each head's ``[dest_pos, src_pos]`` pattern with the tokens on both axes (shortcut
    tokens in red, their columns outlined, the read-out row boxed), and below, the read-out
    position's attention over the tokens as teacher and student bars, shortcut tokens shaded
    and named by class. Images: the picture with the shortcut patches outlined, then each
    head's read-out (CLS) attention over the patch grid laid over the picture. The title says
    how much read-out attention each head puts on shortcut tokens.
    """
    ex = diff.example
    if ex is None:
        raise CircuitKDError("the diff carries no example patterns")
    teacher_head, student_head, sim = choose_pair(diff, teacher_head, student_head)
    _check_head("teacher", teacher_head, ex.teacher.shape[0], ex.teacher.shape[1])
    _check_head("student", student_head, ex.student.shape[0], ex.student.shape[1])
    t_pat = ex.teacher[teacher_head[0], teacher_head[1]]
    s_pat = ex.student[student_head[0], student_head[1]]
    shortcut = sorted(set(ex.shortcut_positions))
    t_mass, s_mass = ex.readout_mass("teacher", teacher_head), ex.readout_mass("student", student_head)
    pair = (f"student head {head_name(*student_head)} ≙ teacher head {head_name(*teacher_head)} "
            + (f"(matched, similarity {sim:.2f})" if sim is not None else "(not matched to each other)"))
    what = "patches" if ex.image is not None else "tokens"
    by_class = []
    for cls, positions in ex.shortcut_classes.items():
        if not positions:
            continue
        words = "" if ex.image is not None else " " + _words([ex.labels[j] for j in positions])
        tc = ex.readout_mass("teacher", teacher_head, positions)
        sc = ex.readout_mass("student", student_head, positions)
        by_class.append(f"{html.escape(cls)}{html.escape(words)}: {tc:.2f} → {sc:.2f}")
    title = (f"Attention on example {ex.index}: {pair}<br><sup>read-out attention on shortcut {what}, teacher → "
             f"student: all {t_mass:.2f} → {s_mass:.2f}" + "".join(f" · {c}" for c in by_class) + "</sup>")
    heads = {"teacher": teacher_head, "student": student_head}
    if ex.image is not None:
        fig = _image_attention(ex, {"teacher": t_pat, "student": s_pat}, heads, shortcut)
    else:
        fig = _text_attention(ex, {"teacher": t_pat, "student": s_pat}, heads, shortcut)
    fig.update_layout(title=dict(text=title, y=1.0, yanchor="top", pad=dict(t=18)))
    return fig


def _words(labels: list[str], most: int = 3) -> str:
    """``'not'`` / ``'teacher, opposed, lawyer…'``: a class's tokens, without their position prefix."""
    words = list(dict.fromkeys(lab.split(":", 1)[-1] for lab in labels))
    return "'" + ", ".join(words[:most]) + ("…" if len(words) > most else "") + "'"


def _text_attention(ex, patterns: dict, heads: dict, shortcut: list[int]) -> go.Figure:
    n, read = ex.length, ex.read_position
    ticks = list(range(n))
    labels = [_tick(lab, j in shortcut) for j, lab in enumerate(ex.labels)]
    zmax = float(max(patterns["teacher"].max(), patterns["student"].max(), 1e-9))
    fig = make_subplots(rows=2, cols=2, row_heights=[0.66, 0.34], vertical_spacing=0.2, horizontal_spacing=0.14,
                        specs=[[{}, {}], [{"colspan": 2}, None]], subplot_titles=(
                            f"teacher head {head_name(*heads['teacher'])}", f"student head {head_name(*heads['student'])}",
                            f"attention from the read-out position ({html.escape(ex.labels[read])})"))
    for col, who in ((1, "teacher"), (2, "student")):
        fig.add_trace(go.Heatmap(
            z=patterns[who].tolist(), x=ticks, y=ticks, zmin=0, zmax=zmax, colorscale="Blues", name=who,
            showscale=col == 2, colorbar=dict(title="attention", len=0.6, y=0.78),
            customdata=[[[ex.labels[d], ex.labels[s]] for s in ticks] for d in ticks],
            hovertemplate=f"{who}: %{{customdata[0]}} → %{{customdata[1]}}<br>attention %{{z:.3f}}<extra></extra>",
            meta={"role": "pattern", "model": who}), row=1, col=col)
        for j in shortcut:
            fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=-0.5, y1=n - 0.5,
                          line=dict(color=_MARK, width=2), row=1, col=col)
        fig.add_shape(type="rect", x0=-0.5, x1=n - 0.5, y0=read - 0.5, y1=read + 0.5,
                      line=dict(color="black", width=2), row=1, col=col)
        axis = dict(tickmode="array", tickvals=ticks, ticktext=labels, tickfont=dict(size=9))
        fig.update_xaxes(title_text="attends to (key)", tickangle=-60, row=1, col=col, **axis)
        fig.update_yaxes(title_text="from (query)" if col == 1 else None, autorange="reversed",
                         row=1, col=col, **axis)
    for j in shortcut:
        fig.add_vrect(x0=j - 0.5, x1=j + 0.5, fillcolor=_MARK, opacity=0.12, line_width=0, row=2, col=1)
    for who, color in (("teacher", "#4c72b0"), ("student", "#dd8452")):
        row = patterns[who][read]
        fig.add_trace(go.Bar(
            x=ticks, y=row.tolist(), name=f"{who} {head_name(*heads[who])}", marker_color=color,
            customdata=ex.labels, hovertemplate=f"{who}: %{{customdata}} %{{y:.3f}}<extra></extra>",
            meta={"role": "readout", "model": who}), row=2, col=1)
    fig.update_xaxes(tickmode="array", tickvals=ticks, ticktext=labels, tickangle=-60, tickfont=dict(size=9),
                     row=2, col=1)
    fig.update_yaxes(title_text="attention", row=2, col=1)
    fig.update_layout(barmode="group", height=900, width=1100, margin=dict(t=110),
                      legend=dict(orientation="h", x=0.5, xanchor="center", y=-0.16))
    return fig


def _image_attention(ex, patterns: dict, heads: dict, shortcut: list[int]) -> go.Figure:
    from circuitkd.attention.common import patch_grid

    image = ex.image
    if image.dim() != 3:
        raise CircuitKDError(f"the example image has shape {tuple(image.shape)}; expected [channel height width]")
    _, height, width = image.shape
    rows, cols = patch_grid(ex.length, height, width)
    ph, pw = height // rows, width // cols
    lo, hi = float(image.min()), float(image.max())
    rgb = ((image - lo) / (hi - lo if hi > lo else 1.0) * 255).round().byte()
    rgb = (rgb.expand(3, -1, -1) if rgb.shape[0] == 1 else rgb[:3]).permute(1, 2, 0).tolist()
    read = ex.read_position
    maps = {who: p[read, 1:].reshape(rows, cols) for who, p in patterns.items()}
    zmax = float(max(maps["teacher"].max(), maps["student"].max(), 1e-9))
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.06, subplot_titles=(
        "input (shortcut patches outlined)", f"teacher head {head_name(*heads['teacher'])}",
        f"student head {head_name(*heads['student'])}"))
    xs = [c * pw + (pw - 1) / 2 for c in range(cols)]
    ys = [r * ph + (ph - 1) / 2 for r in range(rows)]
    # the picture's bright pixels as translucent white dots over each attention map (a scatter
    # layer, which plotly draws above heatmaps; a second image would go underneath)
    bright = [(r, c) for r, line in enumerate(rgb) for c, px in enumerate(line) if max(px) >= 96]
    for col, who in ((1, None), (2, "teacher"), (3, "student")):
        if who is None:
            fig.add_trace(go.Image(z=rgb, hoverinfo="skip", meta={"role": "image"}), row=1, col=col)
        else:
            cls_share = float(patterns[who][read, 0])
            fig.add_trace(go.Heatmap(
                z=maps[who].tolist(), x=xs, y=ys, zmin=0, zmax=zmax, colorscale="Viridis",
                showscale=col == 3, colorbar=dict(title="attention<br>from CLS"),
                customdata=[[[r, c] for c in range(cols)] for r in range(rows)],
                hovertemplate=(f"{who}: patch row %{{customdata[0]}}, col %{{customdata[1]}}<br>attention %{{z:.3f}}"
                               f"<br>(CLS to itself {cls_share:.2f})<extra></extra>"),
                meta={"role": "pattern", "model": who}), row=1, col=col)
            fig.add_trace(go.Scatter(
                x=[c for _, c in bright], y=[r for r, _ in bright], mode="markers", hoverinfo="skip",
                showlegend=False, marker=dict(symbol="square", size=6, color="white", opacity=0.5),
                meta={"role": "strokes", "model": who}), row=1, col=col)
        for j in shortcut:
            if j == 0:
                continue
            r, c = divmod(j - 1, cols)
            fig.add_shape(type="rect", x0=c * pw - 0.5, x1=(c + 1) * pw - 0.5, y0=r * ph - 0.5,
                          y1=(r + 1) * ph - 0.5, line=dict(color="#ff4081", width=2), row=1, col=col)
        fig.update_xaxes(visible=False, range=[-0.5, width - 0.5], row=1, col=col)
        fig.update_yaxes(visible=False, range=[height - 0.5, -0.5], scaleanchor=f"x{col if col > 1 else ''}",
                         row=1, col=col)
    fig.update_layout(height=520, width=1150, margin=dict(t=130))
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
    for (tl, th), (sl, sh), _ in diff.matching:
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
    for i, (t, s, sim) in enumerate(diff.matching):
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
