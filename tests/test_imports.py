"""Every module of the package and every script under analyses/ and benchmarks/ imports.

Run in the fresh virtual environment ``.ci/run`` builds, this turns an undeclared dependency
(a package installed by hand on one machine only) into a failing test instead of a broken
``circuitkd figures`` on the next machine.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import circuitkd

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(circuitkd.__path__, prefix="circuitkd."))
SCRIPTS = sorted(p for folder in ("analyses", "benchmarks") for p in (ROOT / folder).glob("*.py"))


def test_the_package_has_modules_and_scripts_to_check():
    assert "circuitkd.cli" in MODULES and "circuitkd.run.figures" in MODULES
    assert any(p.parent.name == "analyses" for p in SCRIPTS)
    assert any(p.parent.name == "benchmarks" for p in SCRIPTS)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_imports(path):
    spec = importlib.util.spec_from_file_location(f"_script_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # scripts guard their work behind __main__


@pytest.mark.parametrize("requirement", ["kaleido", "PIL", "plotly", "scipy", "mlxtend"])
def test_runtime_dependencies_are_installed(requirement):
    # PNG export and the image loaders need these at run time, not at import time.
    importlib.import_module(requirement)


def test_figures_import_no_training_or_study_code():
    """viz/ builds figures from results: none of its modules imports training, the study or a model builder."""
    import ast
    from pathlib import Path

    viz = Path(__file__).resolve().parents[1] / "circuitkd" / "viz"
    offenders = []
    for path in sorted(viz.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}: {n}" for n in names
                          if n.startswith(("circuitkd.train", "circuitkd.run", "circuitkd.models"))]
    assert not offenders, offenders
