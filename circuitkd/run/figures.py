"""The study's figures, each built from a run folder alone (``results.json`` and ``analysis/``).

``analyses/<name>.py`` scripts and ``circuitkd figures`` call :func:`build` and
:func:`save`; static PNG export goes through kaleido, which drives a local Chromium
(Debian's ``chromium`` package; nothing is downloaded).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

from circuitkd.errors import CircuitKDError


def _results(run_dir: Path) -> list[dict]:
    path = run_dir / "results.json"
    if not path.exists():
        raise CircuitKDError(f"{run_dir} is not a finished run folder (no results.json)")
    return json.loads(path.read_text())["results"]


def _analysis_figure(run_dir: Path, kind: str, pair: Optional[str]):
    import plotly.io as pio

    analysis = run_dir / "analysis" / "analysis.json"
    if not analysis.exists():
        raise CircuitKDError(f"{run_dir} has no analysis yet: run `circuitkd analyse {run_dir}` first")
    names = [c["name"] for c in json.loads(analysis.read_text())["comparisons"]]
    pair = pair or names[0]
    if pair not in names:
        raise CircuitKDError(f"no comparison {pair!r} in {run_dir}; it has {names}")
    path = run_dir / "analysis" / "figures" / f"{pair}__{kind}.json"
    if not path.exists():
        raise CircuitKDError(f"{run_dir} has no {kind} figure for {pair!r} (an analysis from an older circuitkd?): "
                             f"run `circuitkd analyse {run_dir}` again")
    return pio.read_json(str(path))


def _robustness(run_dir: Path, pair: Optional[str] = None):
    from circuitkd.viz.robustness import robustness_figure

    return robustness_figure(_results(run_dir))


def _per_bias(run_dir: Path, pair: Optional[str] = None):
    from circuitkd.viz.robustness import per_bias_figure

    return per_bias_figure(_results(run_dir))


def _fixes(run_dir: Path, pair: Optional[str] = None):
    from circuitkd.viz.robustness import fixes_figure

    return fixes_figure(_results(run_dir))


def _budget(run_dir: Path, pair: Optional[str] = None):
    from circuitkd.viz.robustness import budget_figure

    _results(run_dir)  # a clear error for a folder that holds no run
    budget = json.loads((run_dir / "results.json").read_text()).get("summary", {}).get("budget") or {}
    if not budget.get("points"):
        raise CircuitKDError(f"{run_dir} has no student budget sweep (set student_budgets in its config)")
    return budget_figure(budget)


def _from_analysis(kind: str) -> Callable[..., Any]:
    def build(run_dir: Path, pair: Optional[str] = None):
        return _analysis_figure(run_dir, kind, pair)

    build.__doc__ = f"The {kind.replace('_', ' ')} figure of one teacher/student comparison."
    return build


#: figure name -> builder(run_dir, pair=None) -> plotly Figure
FIGURES: dict[str, Callable[..., Any]] = {
    "robustness": _robustness,
    "per_bias": _per_bias,
    "fixes": _fixes,
    "budget": _budget,
    "head_patching": _from_analysis("head_patching"),
    "attention_diff": _from_analysis("attention_heatmaps"),
    "attention_patterns": _from_analysis("patterns"),
    "head_matching": _from_analysis("matching"),
    "cka": _from_analysis("cka"),
    "circuits": _from_analysis("circuit"),
    "faithfulness": _from_analysis("faithfulness"),
}


def build(name: str, run_dir: str | Path, *, pair: Optional[str] = None):
    """The figure ``name`` (see :data:`FIGURES`) for the run at ``run_dir``."""
    if name not in FIGURES:
        raise CircuitKDError(f"unknown figure {name!r}; known: {sorted(FIGURES)}")
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CircuitKDError(f"run folder not found: {run_dir}")
    return FIGURES[name](run_dir, pair=pair)


def save(fig, path: str | Path, *, scale: float = 1.0) -> Path:
    """Write ``fig`` as PNG (or SVG/PDF/HTML by the suffix), atomically."""
    from circuitkd.models.checkpoint import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".html":
        atomic_write_text(path, fig.to_html(include_plotlyjs=True))
        return path
    try:
        data = fig.to_image(format=path.suffix.lstrip(".") or "png", scale=scale)
    except Exception as exc:  # kaleido raises its own types when no browser is found
        raise CircuitKDError(
            f"static export of {path.name} failed ({type(exc).__name__}: {exc}); kaleido needs a local "
            "Chromium — on Debian: apt-get install chromium") from exc
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def main(name: str, argv: Optional[list[str]] = None) -> int:
    """Command-line entry point shared by the ``analyses/`` scripts."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=f"Write the {name} figure of a circuitkd run folder.")
    parser.add_argument("run", help="run folder written by `circuitkd run`")
    parser.add_argument("--out", default="figures", help="folder for the figure (default: figures/)")
    parser.add_argument("--pair", help="which teacher/student comparison (default: the first, 'plain')")
    parser.add_argument("--format", default="png", choices=["png", "svg", "pdf", "html"])
    args = parser.parse_args(argv)
    try:
        fig = build(name, args.run, pair=args.pair)
        path = save(fig, Path(args.out) / f"{name}.{args.format}")
    except CircuitKDError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
