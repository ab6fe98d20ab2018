"""The head-patching view: teacher and student on one colour scale, matched heads marked."""
from __future__ import annotations

import pytest
import torch

from circuitkd.errors import CircuitKDError
from circuitkd.viz.patching import head_effects_figure

TEACHER = {"effect": [[0.1, -0.2, 0.0], [0.05, 0.6, -0.1], [0.0, 0.2, 0.3]], "sensitivity": 1.5}
STUDENT = {"effect": torch.tensor([[-0.9, 0.1], [0.2, 0.0]]), "sensitivity": 2.25}
# student 0.0 ~ teacher 2.2, 0.1 ~ teacher 1.1, 1.0 ~ teacher 0.0
MATCHING = [((2, 2), (0, 0), 0.9), ((1, 1), (0, 1), 0.8), ((0, 0), (1, 0), 0.4)]


def _cells(fig, xref: str) -> dict[tuple[int, int], str]:
    """``(layer, head) -> outline colour`` of the cells outlined on the panel drawn on ``xref``."""
    return {(round(s.y0 + 0.5), round(s.x0 + 0.5)): s.line.color for s in fig.layout.shapes if s.xref == xref}


def test_one_colour_scale_and_matched_heads_marked():
    fig = head_effects_figure(TEACHER, STUDENT, matching=MATCHING, matching_method="hungarian (one-to-one)",
                              teacher_name="T", student_name="S")
    teacher, student = [t for t in fig.data if t.meta["role"] == "effects"]
    assert torch.allclose(torch.tensor(teacher.z), torch.tensor(TEACHER["effect"]))
    assert (teacher.zmin, teacher.zmax) == (student.zmin, student.zmax)
    assert teacher.zmax == pytest.approx(0.9)
    assert list(teacher.y) == ["L0", "L1", "L2"] and list(student.x) == ["H0", "H1"]  # categorical axes
    t_cells, s_cells = _cells(fig, "x"), _cells(fig, "x2")
    assert set(t_cells) == {(2, 2), (1, 1), (0, 0)} and set(s_cells) == {(0, 0), (0, 1), (1, 0)}
    # the strongest head of each model (student 0.0, teacher 1.1) and its partner are orange
    orange = "#ff7f00"
    assert s_cells[(0, 0)] == orange and t_cells[(2, 2)] == orange
    assert t_cells[(1, 1)] == orange and s_cells[(0, 1)] == orange
    assert t_cells[(0, 0)] != orange
    assert "≙S0.0" in teacher.text[2][2] and "≙T2.2" in student.text[0][0] and "≙" not in teacher.text[0][1]
    assert "matched to student head 0.0 (similarity 0.90)" in teacher.customdata[2][2]
    assert "no matched head" in teacher.customdata[0][1]
    titles = [a.text for a in fig.layout.annotations]
    assert "changes the metric by -1.50" in titles[0] and "changes the metric by -2.25" in titles[1]
    assert "hungarian (one-to-one)" in fig.layout.title.text


def test_without_a_matching_only_the_strongest_heads_are_marked():
    fig = head_effects_figure({"effect": TEACHER["effect"]}, STUDENT)
    assert list(_cells(fig, "x")) == [(1, 1)] and list(_cells(fig, "x2")) == [(0, 0)]
    assert "no head matching given" in fig.layout.title.text


def test_bad_input_is_named():
    with pytest.raises(CircuitKDError, match="student head 4.0, which the 2x2 student effect map does not have"):
        head_effects_figure(TEACHER, STUDENT, matching=[((0, 0), (4, 0), 1.0)])
    with pytest.raises(CircuitKDError, match=r"teacher patching effect has shape \(3,\)"):
        head_effects_figure({"effect": [1.0, 2.0, 3.0]}, STUDENT)
    with pytest.raises(CircuitKDError, match="no 'effect'"):
        head_effects_figure({}, STUDENT)
