"""Figures for activation patching: teacher and student head-effect maps side by side."""
from __future__ import annotations

from typing import Any, Mapping

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots


def head_effects_figure(teacher: Mapping[str, Any], student: Mapping[str, Any], *, teacher_name: str = "teacher",
                        student_name: str = "student",
                        title: str = "Head patching: metric restored by each clean head output") -> go.Figure:
    """Layer × head heatmaps of patching effects for a teacher and a student on one colour scale.

    ``teacher`` / ``student``: dicts with ``effect`` (``[layer, head]`` nested lists or a tensor),
    as written by :func:`circuitkd.study.analyse_run`.
    """
    t = torch.as_tensor(teacher["effect"], dtype=torch.float32)
    s = torch.as_tensor(student["effect"], dtype=torch.float32)
    bound = float(max(t.abs().max(), s.abs().max(), 1e-6))
    fig = make_subplots(rows=1, cols=2, subplot_titles=(teacher_name, student_name), horizontal_spacing=0.12)
    for col, (values, name) in enumerate(((t, teacher_name), (s, student_name)), start=1):
        fig.add_trace(go.Heatmap(
            z=values.tolist(), x=[f"H{h}" for h in range(values.shape[1])], y=[f"L{la}" for la in range(values.shape[0])],
            zmin=-bound, zmax=bound, colorscale="RdBu", showscale=col == 2, name=name,
            hovertemplate="%{y} %{x}: %{z:.3f}<extra>" + name + "</extra>",
            text=[[f"{v:.2f}" for v in row] for row in values.tolist()], texttemplate="%{text}"), row=1, col=col)
        fig.update_yaxes(autorange="reversed", row=1, col=col)
    fig.update_layout(title=title, height=320 + 30 * max(t.shape[0], s.shape[0]), width=900)
    return fig
