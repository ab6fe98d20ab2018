"""The analysis stage, the report, the figure scripts and the notebook, on one quick run."""
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuitkd.circuits import Circuit
from circuitkd.errors import CircuitKDError
from circuitkd.run.figures import FIGURES
from circuitkd.run.report import FIGURE_ORDER, markdown_to_html, write_report

ROOT = Path(__file__).resolve().parents[1]


def test_analysis_covers_every_pair_that_matters(quick_run):
    analysis = json.loads((quick_run / "analysis" / "analysis.json").read_text())
    names = [c["name"] for c in analysis["comparisons"]]
    assert names[0] == "plain" and "group_dro" in names
    assert {f"group_dro+{fix}" for fix in ("augment", "iterative", "init", "attention", "attention_circuit")} <= set(names)
    assert analysis["mechanism_finding"]["verdict"] == "inconclusive (1 seed)"
    assert set(analysis["over_seeds"]) == set(names)
    for cmp in analysis["comparisons"]:
        assert cmp["findings"] and cmp["attention_summary"]
        effect = torch.tensor(cmp["student_patching"]["effect"])
        assert effect.dim() == 2 and torch.isfinite(effect).all()
        for kind in FIGURE_ORDER[:-1]:
            assert (quick_run / "analysis" / "figures" / f"{cmp['name']}__{kind}.json").exists(), kind
        # each finding names the figure that shows it (the report links them)
        assert len(cmp["finding_figures"]) == len(cmp["findings"])
        assert {k for k in cmp["finding_figures"] if k} <= set(FIGURE_ORDER)
        assert {"head_patching", "patterns", "circuit"} <= set(cmp["finding_figures"])
    for path in (quick_run / "analysis" / "circuits").glob("*.json"):
        circuit = Circuit.from_json(path)
        assert circuit.scores.numel() > 0 and circuit.mask.any()


def test_analysis_of_a_folder_that_is_not_a_run(tmp_path):
    from circuitkd.run.study import analyse_run

    with pytest.raises(CircuitKDError, match="not a finished run folder"):
        analyse_run(tmp_path)


def test_markdown_tables_become_html_tables():
    html = markdown_to_html("# T\n\nsome *text*\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert "<table>" in html and "<th>a</th>" in html and "<td>2</td>" in html and "<i>text</i>" in html


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_draws_every_figure_in_a_real_browser(quick_run, tmp_path):
    report = write_report(quick_run)
    page = report.read_text()
    n_figures = page.count('class="plotly-graph-div"')
    links, ids = re.findall(r"href='#([^']+)'", page), set(re.findall(r"id='([^']+)'", page))
    assert any(link.endswith("--circuit") for link in links) and set(links) <= ids  # findings -> figures
    # robustness figures + the analysis figures of each of the five comparisons (faithfulness optional)
    assert n_figures >= 3 + 5 * (len(FIGURE_ORDER) - 1)
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("no chromium on this machine")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom",
         report.as_uri()],
        capture_output=True, text=True, timeout=180).stdout
    # plotly draws each figure into an <svg class="main-svg">; an undrawn div stays empty
    drawn = dom.count('class="main-svg"')
    assert drawn >= n_figures, (drawn, n_figures)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_every_analysis_script_writes_its_figure(quick_run, tmp_path, name, monkeypatch):
    script = ROOT / "analyses" / f"{name}.py"
    assert script.exists()
    monkeypatch.setattr(sys, "argv", [str(script), str(quick_run), "--out", str(tmp_path), "--format", "html"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    assert (tmp_path / f"{name}.html").stat().st_size > 1000


def test_png_export_works_offline(quick_run, tmp_path):
    if _chromium() is None and not os.environ.get("CI"):
        pytest.skip("no chromium on this machine")
    from circuitkd.run.figures import build, save

    path = save(build("robustness", quick_run), tmp_path / "robustness.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_notebook_runs_headless(quick_run):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    os.environ["CIRCUITKD_RUN"] = str(quick_run)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        del os.environ["CIRCUITKD_RUN"]
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
