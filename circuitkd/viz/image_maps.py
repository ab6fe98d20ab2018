"""Pictures of a ViT's heads over an image: CLS attention maps and head patching per patch position.

Pure builders: they take the image and numbers already computed
(:mod:`circuitkd.image_mechanisms`) and return a ``plotly.graph_objects.Figure``.
"""
from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from circuitkd.errors import CircuitKDError


def _rgb(image: Tensor) -> list:
    lo, hi = float(image.min()), float(image.max())
    rgb = ((image - lo) / (hi - lo if hi > lo else 1.0) * 255).round().byte()
    return (rgb.expand(3, -1, -1) if rgb.shape[0] == 1 else rgb[:3]).permute(1, 2, 0).tolist()


def _grid(image: Tensor, panels: dict[str, Tensor], *, zmid_zero: bool, colorbar: str, title: str,
          teacher_name: str, student_name: str) -> go.Figure:
    """One row per layer (teacher's, then student's), one column per head, plus the input image.

    ``panels``: "teacher" / "student" -> ``[layer head rows cols]`` values over the patch grid.
    """
    if image.dim() != 3:
        raise CircuitKDError(f"image has shape {tuple(image.shape)}; expected [channel height width]")
    _, height, width = image.shape
    t, s = panels["teacher"], panels["student"]
    if t.dim() != 4 or s.dim() != 4 or t.shape[-2:] != s.shape[-2:]:
        raise CircuitKDError(f"expected [layer head rows cols] maps on one patch grid, got {tuple(t.shape)} "
                             f"and {tuple(s.shape)}")
    rows_p, cols_p = t.shape[-2:]
    if height % rows_p or width % cols_p:
        raise CircuitKDError(f"a {rows_p}x{cols_p} patch grid does not tile a {height}x{width} image")
    ph, pw = height // rows_p, width // cols_p
    layers = [("teacher", teacher_name, layer) for layer in range(t.shape[0])] + \
             [("student", student_name, layer) for layer in range(s.shape[0])]
    n_heads = max(t.shape[1], s.shape[1])
    titles = []
    for r, (who, _, layer) in enumerate(layers):
        titles.append("input" if r == 0 else "")
        n = (t if who == "teacher" else s).shape[1]
        titles += [f"{who} {layer}.{h}" if h < n else "" for h in range(n_heads)]
    fig = make_subplots(rows=len(layers), cols=n_heads + 1, subplot_titles=titles, horizontal_spacing=0.01,
                        vertical_spacing=0.03)
    both = torch.cat([t.flatten(), s.flatten()])
    zmax = float(both.abs().max()) if zmid_zero else float(both.max())
    zmax = max(zmax, 1e-9)
    rgb = _rgb(image)
    bright = [(r, c) for r, line in enumerate(rgb) for c, px in enumerate(line) if max(px) >= 96]
    xs = [c * pw + (pw - 1) / 2 for c in range(cols_p)]
    ys = [r * ph + (ph - 1) / 2 for r in range(rows_p)]
    shown_scale = False
    for r, (who, name, layer) in enumerate(layers, start=1):
        values = t if who == "teacher" else s
        if r == 1:
            fig.add_trace(go.Image(z=rgb, hoverinfo="skip", meta={"role": "image"}), row=1, col=1)
        for h in range(values.shape[1]):
            col = h + 2
            fig.add_trace(go.Heatmap(
                z=values[layer, h].tolist(), x=xs, y=ys, zmin=-zmax if zmid_zero else 0, zmax=zmax,
                colorscale="RdBu" if zmid_zero else "Viridis", reversescale=zmid_zero,
                showscale=not shown_scale, colorbar=dict(title=colorbar),
                hovertemplate=f"{name} head {layer}.{h}<br>patch row %{{y}}, col %{{x}}<br>%{{z:.3f}}<extra></extra>",
                meta={"role": "map", "model": who, "layer": layer, "head": h}), row=r, col=col)
            shown_scale = True
            fig.add_trace(go.Scatter(
                x=[c for _, c in bright], y=[rr for rr, _ in bright], mode="markers", hoverinfo="skip",
                showlegend=False, marker=dict(symbol="square", size=3, color="white", opacity=0.45),
                meta={"role": "strokes"}), row=r, col=col)
    for r in range(1, len(layers) + 1):
        for col in range(1, n_heads + 2):
            fig.update_xaxes(visible=False, range=[-0.5, width - 0.5], row=r, col=col)
            fig.update_yaxes(visible=False, range=[height - 0.5, -0.5], row=r, col=col)
    fig.update_layout(title=title, height=150 * len(layers) + 120, width=150 * (n_heads + 1) + 160,
                      margin=dict(t=110, l=20, r=20, b=20))
    return fig


def head_attention_grid(image: Float[Tensor, "channel height width"],
                        teacher_maps: Float[Tensor, "t_layer t_head rows cols"],
                        student_maps: Float[Tensor, "s_layer s_head rows cols"], *, teacher_name: str = "teacher",
                        student_name: str = "student", title: str = "CLS attention per head") -> go.Figure:
    """Every head's attention from CLS to each patch, drawn over the image (stroke pixels as dots)."""
    return _grid(image, {"teacher": teacher_maps, "student": student_maps}, zmid_zero=False,
                 colorbar="attention<br>from CLS", title=title, teacher_name=teacher_name, student_name=student_name)


def patch_position_effects(image: Float[Tensor, "channel height width"], teacher_effects: Sequence,
                           student_effects: Sequence, *, teacher_name: str = "teacher",
                           student_name: str = "student", title: str = "Head patching per patch position"
                           ) -> go.Figure:
    """Per head, the patching effect of each patch position (``[layer head pos]`` with position 0 =
    CLS, then the patches in raster order) laid out on the patch grid over the image."""
    maps = {}
    for who, effects in (("teacher", teacher_effects), ("student", student_effects)):
        e = torch.as_tensor(effects, dtype=torch.float32)
        if e.dim() != 3:
            raise CircuitKDError(f"{who} effects have shape {tuple(e.shape)}; expected [layer head pos]")
        side = int(round((e.shape[-1] - 1) ** 0.5))
        if side * side != e.shape[-1] - 1:
            raise CircuitKDError(f"{e.shape[-1] - 1} patch positions do not form a square grid")
        maps[who] = e[..., 1:].reshape(*e.shape[:2], side, side)
    return _grid(image, maps, zmid_zero=True, colorbar="logit-diff<br>restored", title=title,
                 teacher_name=teacher_name, student_name=student_name)
