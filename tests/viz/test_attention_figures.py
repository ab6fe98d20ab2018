"""Attention figures: built from a diff of tiny models, returned (never shown), templates untouched."""
from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio
import pytest

from circuitkd import attention as A
from circuitkd.errors import CircuitKDError
from tests.test_attention import nli_like_task, tiny


@pytest.fixture(scope="module")
def diff():
    import torch

    torch.manual_seed(0)
    task = nli_like_task(8)
    teacher = tiny(n_layers=2, n_heads=4, d_model=32)
    student = tiny(n_layers=1, n_heads=2, d_model=16, seed=1)
    return A.diff_attention(teacher, student, task, n=None, confirm="none")


@pytest.fixture(autouse=True)
def no_show(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a figure builder called .show()")

    monkeypatch.setattr(go.Figure, "show", refuse)
    template = pio.templates.default
    yield
    assert pio.templates.default == template


def _roles(fig, role, model=None):
    return [t for t in fig.data if isinstance(t.meta, dict) and t.meta.get("role") == role
            and (model is None or t.meta.get("model") == model)]


def test_pattern_figure_shows_a_matched_pair_on_the_tokens_with_shortcuts_marked(diff):
    from circuitkd.viz.attention import pattern_figure

    ex = diff.example
    (t_head, s_head, sim) = diff.matching[1]
    fig = pattern_figure(diff, student_head=s_head)  # the teacher head matched to it is chosen
    assert isinstance(fig, go.Figure)
    (t_map,), (s_map,) = _roles(fig, "pattern", "teacher"), _roles(fig, "pattern", "student")
    assert list(map(list, t_map.z)) == ex.teacher[t_head].tolist()
    assert list(map(list, s_map.z)) == ex.student[s_head].tolist()
    assert t_map.zmax == s_map.zmax  # one colour scale
    # tokens on both axes, shortcut tokens in red, their columns outlined in both panels
    for axis in (fig.layout.xaxis, fig.layout.yaxis, fig.layout.xaxis2):
        assert len(axis.ticktext) == ex.length
        marked = [i for i, t in enumerate(axis.ticktext) if "color:#d62728" in t]
        assert marked == ex.shortcut_positions
    outlines = [sh for sh in fig.layout.shapes if sh.line.color == "#d62728"]
    assert len(outlines) == 2 * len(ex.shortcut_positions) > 0
    # the read-out row as bars, one per model
    (t_bar,), (s_bar,) = _roles(fig, "readout", "teacher"), _roles(fig, "readout", "student")
    assert list(s_bar.y) == ex.student[s_head][ex.read_position].tolist()
    assert list(t_bar.y) == ex.teacher[t_head][ex.read_position].tolist()
    title = fig.layout.title.text
    assert f"student head {A.head_name(*s_head)} ≙ teacher head {A.head_name(*t_head)}" in title
    assert f"similarity {sim:.2f}" in title
    mass = ex.readout_mass("student", s_head)
    assert f"→ {mass:.2f}" in title
    default = pattern_figure(diff)  # the pair whose shortcut attention changed most
    i = int(diff.shortcut_change.abs().argmax())
    assert f"student head {A.head_name(*diff.matching[i][1])}" in default.layout.title.text
    unmatched = pattern_figure(diff, teacher_head=(0, 0), student_head=s_head)
    assert "not matched to each other" in unmatched.layout.title.text
    with pytest.raises(CircuitKDError, match="student head 3.0 does not exist"):
        pattern_figure(diff, teacher_head=(0, 0), student_head=(3, 0))
    unmatched_teacher = next((la, h) for la in range(2) for h in range(4)
                             if (la, h) not in [t for t, _, _ in diff.matching])
    with pytest.raises(CircuitKDError, match="matched to no student head"):
        pattern_figure(diff, teacher_head=unmatched_teacher)


def test_pattern_figure_of_an_image_draws_attention_over_the_picture(diff):
    import dataclasses

    import torch

    from circuitkd.viz.attention import pattern_figure

    # an 8x8 picture in 4x4 patches: positions CLS, (0,0), (0,1), (1,0), (1,1)
    g = torch.Generator().manual_seed(0)
    teacher = torch.softmax(torch.randn(2, 4, 5, 5, generator=g), -1)
    student = torch.softmax(torch.randn(1, 2, 5, 5, generator=g), -1)
    image = torch.zeros(3, 8, 8)
    image[0, :4, 4:] = 1.0  # a red block in patch (0, 1): the shortcut
    ex = A.ExamplePatterns(index=3, labels=["CLS", "p0", "p1", "p2", "p3"], teacher=teacher, student=student,
                           shortcut_positions=[2], length=5, shortcut_classes={"colored": [2]}, image=image)
    fig = pattern_figure(dataclasses.replace(diff, example=ex), teacher_head=(1, 2), student_head=(0, 1))
    (t_map,), (s_map,) = _roles(fig, "pattern", "teacher"), _roles(fig, "pattern", "student")
    assert list(map(list, t_map.z)) == teacher[1, 2, 0, 1:].reshape(2, 2).tolist()
    assert list(map(list, s_map.z)) == student[0, 1, 0, 1:].reshape(2, 2).tolist()
    assert list(t_map.x) == [1.5, 5.5] and list(t_map.y) == [1.5, 5.5]  # patch centres in pixels
    pictures = [t for t in fig.data if isinstance(t, go.Image)]
    assert len(pictures) == 1 and list(pictures[0].z[0][4]) == [255, 0, 0]
    strokes = _roles(fig, "strokes")
    assert len(strokes) == 2 and len(strokes[0].x) == 16  # the red block's pixels over each map
    boxes = fig.layout.shapes
    assert len(boxes) == 3 and all((b.x0, b.x1, b.y0, b.y1) == (3.5, 7.5, -0.5, 3.5) for b in boxes)
    assert "colored: " in fig.layout.title.text
    bad = dataclasses.replace(ex, image=torch.zeros(3, 8, 9))
    with pytest.raises(CircuitKDError, match="cannot lay 4 square patches"):
        pattern_figure(dataclasses.replace(diff, example=bad), teacher_head=(1, 2), student_head=(0, 1))


def test_shortcut_heatmaps_and_matched_difference(diff):
    from circuitkd.viz.attention import shortcut_heatmaps

    fig = shortcut_heatmaps(diff)
    t, s, d = fig.data
    assert list(map(list, t.z)) == diff.teacher.from_read["shortcut"].tolist()
    assert list(map(list, s.z)) == diff.student.from_read["shortcut"].tolist()
    for i, (_, (sl, sh), _) in enumerate(diff.matching):
        assert d.z[sl][sh] == pytest.approx(float(diff.shortcut_change[i]), abs=1e-6)
    assert "hungarian" in fig.layout.title.text
    neg = shortcut_heatmaps(diff, "negation", source="all")
    assert list(map(list, neg.data[0].z)) == diff.teacher.from_all["negation"].tolist()


def test_matching_bipartite_and_cka(diff):
    from circuitkd.viz.attention import attention_figures, cka_figure, matching_figure

    fig = matching_figure(diff)
    edges = [t for t in fig.data if t.mode == "lines"]
    nodes = [t for t in fig.data if t.mode == "markers+text"]
    assert len(edges) == len(diff.matching) == 2
    assert [len(n.x) for n in nodes] == [8, 2]
    assert "hungarian (one-to-one, 6 of 8 teacher heads unmatched)" in fig.layout.title.text
    cka = cka_figure(diff)
    assert list(map(list, cka.data[0].z)) == diff.cka.tolist()
    assert set(attention_figures(diff)) == {"patterns", "shortcut", "matching", "cka"}


def test_viz_package_is_import_light():
    import ast
    from pathlib import Path

    import circuitkd.viz

    tree = ast.parse(Path(circuitkd.viz.__file__).read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
               and getattr(n, "module", None) != "__future__"]
    assert imports == []  # figure modules are imported on demand
