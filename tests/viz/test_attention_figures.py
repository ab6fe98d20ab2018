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
    return A.diff_attention(teacher, student, task, n=None, confirm=False)


@pytest.fixture(autouse=True)
def no_show(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a figure builder called .show()")

    monkeypatch.setattr(go.Figure, "show", refuse)
    template = pio.templates.default
    yield
    assert pio.templates.default == template


def test_pattern_figure_side_by_side_with_shortcut_tokens_marked(diff):
    from circuitkd.viz.attention import pattern_figure

    fig = pattern_figure(diff, teacher_head=(1, 3), student_head=(0, 1))
    assert isinstance(fig, go.Figure)
    heat = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert len(heat) == 2
    ex = diff.example
    assert list(map(list, heat[0].z)) == ex.teacher[1, 3].tolist()
    assert list(map(list, heat[1].z)) == ex.student[0, 1].tolist()
    assert len(fig.layout.shapes) == 2 * len(ex.shortcut_positions) > 0
    ticks = fig.layout.xaxis.ticktext
    assert sum(t.startswith("<b>*") for t in ticks) == len(ex.shortcut_positions)
    assert "teacher 1.3" in fig.layout.annotations[0].text and "student 0.1" in fig.layout.annotations[1].text
    default = pattern_figure(diff)  # the pair whose shortcut attention changed most
    i = int(diff.shortcut_change.abs().argmax())
    assert f"student {A.head_name(*diff.matching[i][0])}" == default.layout.annotations[1].text
    with pytest.raises(CircuitKDError, match="student head 3.0 does not exist"):
        pattern_figure(diff, student_head=(3, 0))


def test_shortcut_heatmaps_and_matched_difference(diff):
    from circuitkd.viz.attention import shortcut_heatmaps

    fig = shortcut_heatmaps(diff)
    t, s, d = fig.data
    assert list(map(list, t.z)) == diff.teacher.from_read["shortcut"].tolist()
    assert list(map(list, s.z)) == diff.student.from_read["shortcut"].tolist()
    for i, ((sl, sh), _, _) in enumerate(diff.matching):
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
