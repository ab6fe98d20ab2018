"""The report's mechanisms section: every finding links to the figure that shows it."""
from __future__ import annotations

import html
import re

import plotly.graph_objects as go

from circuitkd.run.report import FIGURE_ORDER, FIGURE_TITLES, figure_anchor, mechanisms_html


def _analysis(findings: list[tuple[str, str | None]]) -> dict:
    return {"comparisons": [{
        "name": "poe+init", "what": "poe teacher vs the student distilled with the init fix",
        "teacher": "teacher-poe-s0", "student": "student-init-poe-s0",
        "teacher_scores": {"ood_acc": 0.8}, "student_scores": {"ood_acc": 0.6},
        "findings": [f for f, _ in findings], "finding_figures": [k for _, k in findings],
        "attention_summary": ["a line"]}]}


def test_each_finding_links_to_its_figure(tmp_path):
    findings = [("Flipping the shortcut lowers the metric.", "head_patching"),
                ("Student head 0.1 looks at 'not'.", "patterns"),
                ("3/20 teacher edges survive.", "circuit"),
                ("Matched by depth instead, 1/20 survive.", None),
                ("The teacher's circuit recovers 90%.", "faithfulness")]  # no faithfulness figure written
    for kind in ("head_patching", "patterns", "circuit", "cka"):
        (tmp_path / f"poe+init__{kind}.json").write_text(go.Figure(go.Scatter(x=[0], y=[0])).to_json())
    page = "\n".join(mechanisms_html(_analysis(findings), tmp_path))
    items = re.findall(r"<li>(.*?)</li>", page.split("<details>")[0])
    assert len(items) == len(findings)
    ids = set(re.findall(r"id='([^']+)'", page))
    for (line, kind), item in zip(findings, items):
        links = re.findall(r"href='#([^']+)'", item)
        if kind in ("head_patching", "patterns", "circuit"):
            assert links == [figure_anchor("poe+init", kind)] and links[0] in ids, item
            assert html.escape(FIGURE_TITLES[kind].lower()) in item
        else:  # no figure shows it, or none was written: no dangling link
            assert links == [], item
    # the figures appear in reading order, each in a captioned block the links point at
    blocks = re.findall(r"<div class='figure' id='([^']+)'><h4>([^<]+)</h4>", page)
    assert [b[0] for b in blocks] == [figure_anchor("poe+init", k) for k in FIGURE_ORDER
                                      if k in ("head_patching", "patterns", "circuit", "cka")]
    assert "poe-init--circuit" in ids


def test_an_older_analysis_without_figure_kinds_gets_no_links(tmp_path):
    analysis = _analysis([("a finding", None)])
    del analysis["comparisons"][0]["finding_figures"]
    page = "\n".join(mechanisms_html(analysis, tmp_path))
    assert "<li>a finding</li>" in page and "href" not in page
