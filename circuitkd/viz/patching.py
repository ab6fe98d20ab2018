"""Figures for activation patching: teacher and student head-effect maps side by side."""
from __future__ import annotations

import html
from typing import Any, Mapping, Optional, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from circuitkd.errors import CircuitKDError

_STRONGEST = "#ff7f00"


def _effects(result: Mapping[str, Any], who: str) -> torch.Tensor:
    if "effect" not in result:
        raise CircuitKDError(f"the {who} patching result has no 'effect' (keys: {sorted(result)})")
    effect = torch.as_tensor(result["effect"], dtype=torch.float32)
    if effect.dim() != 2:
        raise CircuitKDError(f"the {who} patching effect has shape {tuple(effect.shape)}; expected [layer, head]")
    return effect


def head_effects_figure(teacher: Mapping[str, Any], student: Mapping[str, Any], *,
                        matching: Optional[Sequence[tuple[tuple[int, int], tuple[int, int], float]]] = None,
                        matching_method: Optional[str] = None, teacher_name: str = "teacher",
                        student_name: str = "student",
                        title: str = "Head patching: metric restored by each clean head output") -> go.Figure:
    """Layer × head heatmaps of patching effects for a teacher and a student on one colour scale.

    Args:
        teacher, student: dicts with ``effect`` (``[layer, head]`` nested lists or a tensor) and
            optionally ``sensitivity`` (the metric's clean − corrupt drop), as written by
            :func:`circuitkd.run.study.analyse_run`.
        matching: ``[((teacher layer, head), (student layer, head), similarity), ...]``
            (:attr:`circuitkd.attention.AttentionDiff.matching`); each matched head is outlined
            and names its partner under its value (``≙S0.1``), unmatched teacher heads stay plain.

    The head with the largest ``|effect|`` in each model is outlined in orange, and so is its
    matched partner in the other model, so "the student's strongest head is matched to a teacher
    head that does nothing" reads without hovering.
    """
    t, s = _effects(teacher, "teacher"), _effects(student, "student")
    pairs = [(tuple(sh), tuple(th), float(sim)) for th, sh, sim in (matching or [])]
    for sh, th, _ in pairs:
        if not (0 <= sh[0] < s.shape[0] and 0 <= sh[1] < s.shape[1]):
            raise CircuitKDError(f"the matching names student head {sh[0]}.{sh[1]}, which the "
                                 f"{s.shape[0]}x{s.shape[1]} student effect map does not have")
        if not (0 <= th[0] < t.shape[0] and 0 <= th[1] < t.shape[1]):
            raise CircuitKDError(f"the matching names teacher head {th[0]}.{th[1]}, which the "
                                 f"{t.shape[0]}x{t.shape[1]} teacher effect map does not have")
    partner = {"teacher": {}, "student": {}}
    for sh, th, sim in pairs:
        partner["student"].setdefault(sh, []).append((th, sim))
        partner["teacher"].setdefault(th, []).append((sh, sim))
    bound = float(max(t.abs().max(), s.abs().max(), 1e-6))
    maps = {"teacher": t, "student": s}
    names = {"teacher": teacher_name, "student": student_name}
    strongest = {who: divmod(int(v.abs().argmax()), v.shape[1]) for who, v in maps.items()}
    marked = {"teacher": {strongest["teacher"]}, "student": {strongest["student"]}}
    for who, other in (("teacher", "student"), ("student", "teacher")):
        for mate, _ in partner[who].get(strongest[who], []):
            marked[other].add(mate)

    def subtitle(who: str, result: Mapping[str, Any]) -> str:
        sens = result.get("sensitivity")
        drop = (f"<br><sup>flipping the shortcut changes the metric by {-float(sens):+.2f}</sup>"
                if sens is not None else "")
        return f"{who} {html.escape(names[who])}{drop}"

    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=(subtitle("teacher", teacher), subtitle("student", student)))
    for col, who in ((1, "teacher"), (2, "student")):
        values = maps[who]
        other = "S" if who == "teacher" else "T"
        n_layers, n_heads = values.shape
        text, hover = [], []
        for la in range(n_layers):
            text_row, hover_row = [], []
            for h in range(n_heads):
                v = float(values[la, h])
                mates = partner[who].get((la, h), [])
                mate = ",".join(f"{m[0]}.{m[1]}" for m, _ in mates)
                text_row.append(f"{v:+.2f}" + (f"<br><span style='font-size:10px'>≙{other}{mate}</span>" if mates else ""))
                hover_row.append(f"{who} head {la}.{h}: {v:+.3f}<br>" + (
                    "matched to " + ", ".join(f"{'student' if who == 'teacher' else 'teacher'} head {m[0]}.{m[1]} "
                                              f"(similarity {sim:.2f})" for m, sim in mates)
                    if mates else ("no matched head" if pairs else "no matching given")))
            text.append(text_row)
            hover.append(hover_row)
        fig.add_trace(go.Heatmap(
            z=values.tolist(), x=[f"H{h}" for h in range(n_heads)], y=[f"L{la}" for la in range(n_layers)],
            zmin=-bound, zmax=bound, colorscale="RdBu", showscale=col == 2, name=who,
            colorbar=dict(title="metric<br>restored"), text=text, texttemplate="%{text}", textfont=dict(size=12),
            customdata=hover,
            hovertemplate="%{customdata}<extra></extra>", meta={"role": "effects", "model": who}), row=1, col=col)
        for la in range(n_layers):
            for h in range(n_heads):
                if (la, h) in marked[who]:
                    line = dict(color=_STRONGEST, width=4)
                elif partner[who].get((la, h)):
                    line = dict(color="#424242", width=1.5)
                else:
                    continue
                fig.add_shape(type="rect", x0=h - 0.5, x1=h + 0.5, y0=la - 0.5, y1=la + 0.5, line=line,
                              row=1, col=col)
        fig.update_xaxes(title_text="head", row=1, col=col)
        fig.update_yaxes(title_text="layer" if col == 1 else None, autorange="reversed", row=1, col=col)
    how = f"heads matched {html.escape(matching_method)}" if matching_method else (
        "matched heads outlined" if pairs else "no head matching given")
    key = (f"<br><sup>one colour scale for both · {how} · orange: each model's strongest head and its "
           "matched partner</sup>")
    fig.update_layout(title=dict(text=html.escape(title) + key, y=1.0, yanchor="top", pad=dict(t=14)),
                      height=360 + 45 * max(t.shape[0], s.shape[0]), width=1000, margin=dict(t=130))
    return fig
