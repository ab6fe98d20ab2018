"""Each view drawn by a real browser: headless Chromium renders one page of the figures, and the
rendered SVG must hold what the figure objects promise — every trace, node and heatmap drawn,
and every circuit edge starting and ending on a drawn node, in pixels."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess

import pytest
import torch

from circuitkd import attention as A
from circuitkd.viz.attention import pattern_figure
from circuitkd.viz.circuits import circuit_figure
from circuitkd.viz.patching import head_effects_figure

from .figure_checks import traces

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# plotly adds classes to a point (``point plotly-customdata``) when the trace carries customdata
_TRANSLATE = re.compile(r'class="point[^"]*" transform="translate\(([-\d.e]+),([-\d.e]+)\)')


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def figures():
    from tests.test_attention import nli_like_task, tiny

    from .test_circuit_figure import MATCHES, STUDENT, STUDENT_UNKEPT, TEACHER, make_circuit

    import circuitkd as ckd
    from circuitkd.circuits.compare import head_matching

    teacher_c, student_c = make_circuit(3, 3, TEACHER), make_circuit(2, 2, STUDENT, STUDENT_UNKEPT)
    cmp = ckd.compare_circuits(teacher_c, student_c, matching=head_matching(teacher_c, student_c, MATCHES))
    torch.manual_seed(0)
    diff = A.diff_attention(tiny(n_layers=2, n_heads=4, d_model=32), tiny(n_layers=1, n_heads=2, d_model=16, seed=1),
                            nli_like_task(8), n=None, confirm="none")
    g = torch.Generator().manual_seed(0)
    image = torch.zeros(3, 8, 8)
    image[0, :4, 4:] = 1.0
    img_ex = A.ExamplePatterns(index=0, labels=["CLS", "p0", "p1", "p2", "p3"],
                               teacher=torch.softmax(torch.randn(2, 4, 5, 5, generator=g), -1),
                               student=torch.softmax(torch.randn(1, 2, 5, 5, generator=g), -1),
                               shortcut_positions=[2], length=5, shortcut_classes={"colored": [2]}, image=image)
    effects = {"teacher": {"effect": torch.randn(2, 4, generator=g), "sensitivity": 1.0},
               "student": {"effect": torch.randn(1, 2, generator=g), "sensitivity": 2.0}}
    return {
        "circuit": circuit_figure(teacher_c, student_c, cmp),
        "attention_text": pattern_figure(diff),
        "attention_image": pattern_figure(dataclasses.replace(diff, example=img_ex), teacher_head=(1, 2),
                                          student_head=(0, 1)),
        "patching": head_effects_figure(effects["teacher"], effects["student"], matching=diff.matching),
    }


@pytest.fixture(scope="module")
def rendered(figures, tmp_path_factory):
    """``name -> the figure's rendered DOM`` from one Chromium run over one page of all figures."""
    import plotly.offline

    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("no chromium on this machine")
    tmp = tmp_path_factory.mktemp("render")
    page = tmp / "figures.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><script>" + plotly.offline.get_plotlyjs()
                    + "</script></head><body>" + "".join(
                        fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}")
                        for name, fig in figures.items()) + "</body></html>")
    dom = subprocess.run([browser, *_FLAGS, f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=20000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180).stdout
    starts = {name: dom.index(f'id="fig-{name}"') for name in figures}
    ends = sorted(starts.values())[1:] + [len(dom)]
    return {name: dom[start:ends[sorted(starts.values()).index(start)]] for name, start in starts.items()}


def _scatter_blocks(svg: str) -> list[str]:
    """The rendered scatter traces, in trace order (plotly draws one ``g.trace.scatter`` each)."""
    return svg.split('class="trace scatter')[1:]


def _line_ends(block: str) -> tuple[tuple[float, float], tuple[float, float]]:
    (d,) = re.findall(r'class="js-line" d="([^"]+)"', block)
    points = [tuple(map(float, p.split(","))) for p in re.findall(r"[-\d.e]+,[-\d.e]+", d)]
    return points[0], points[-1]


def test_circuit_edges_start_and_end_on_drawn_nodes_in_pixels(figures, rendered):
    fig, svg = figures["circuit"], rendered["circuit"]
    assert 'class="main-svg"' in svg
    scatter = [t for t in fig.data if t.type == "scatter"]
    blocks = _scatter_blocks(svg)
    assert len(blocks) == len(scatter)
    drawn = dict(zip([id(t) for t in scatter], blocks))
    for model in ("teacher", "student"):
        (nodes,) = traces(fig, "nodes", model)
        points = [tuple(map(float, p)) for p in _TRANSLATE.findall(drawn[id(nodes)])]
        assert len(points) == len(nodes.x) > 0  # every circuit node drawn
        edges = traces(fig, "edge", model)
        assert edges
        for edge in edges:
            start, end = _line_ends(drawn[id(edge)])
            for end_point, what in ((start, "starts"), (end, "ends")):
                gap = min(abs(end_point[0] - x) + abs(end_point[1] - y) for x, y in points)
                assert gap < 1.0, f"{model} edge {edge.meta['edge']} {what} {gap:.1f}px from any drawn node"


def test_attention_views_draw_both_heads(figures, rendered):
    text, image = rendered["attention_text"], rendered["attention_image"]
    ex_len = figures["attention_text"].layout.xaxis.ticktext
    assert text.count('class="hm"') == 2  # teacher and student patterns
    assert text.count('class="trace bars"') == 2
    assert len(re.findall(r'class="point[ "]', text.split('class="barlayer')[1])) == 2 * len(ex_len)
    assert len(re.findall(r"<path data-index=", text)) == len(figures["attention_text"].layout.shapes)
    assert image.count('class="hm"') == 2 and image.count('class="im"') == 1  # two maps over one picture
    assert len(_scatter_blocks(image)) == 2  # the picture's strokes over each map


def test_patching_view_draws_both_maps_and_the_marks(figures, rendered):
    svg = rendered["patching"]
    assert svg.count('class="hm"') == 2
    assert len(re.findall(r"<path data-index=", svg)) == len(figures["patching"].layout.shapes) > 0
