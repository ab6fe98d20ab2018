"""The API reference builds from the docstrings (pdoc), and docs/ holds the architecture page."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_builds(tmp_path):
    import pkgutil

    import pdoc

    import circuitkd

    modules = ["circuitkd", *(m.name for m in pkgutil.walk_packages(circuitkd.__path__, prefix="circuitkd."))]
    pdoc.pdoc(*modules, output_directory=tmp_path)
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    for page in ("circuitkd.html", "circuitkd/stats.html", "circuitkd/native.html", "circuitkd/run/summary.html",
                 "circuitkd/circuits.html", "circuitkd/train/distill.html"):
        assert page in pages, sorted(pages)
    assert "bootstrap_interval" in (tmp_path / "circuitkd" / "stats.html").read_text()


def test_architecture_page_names_every_top_level_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = sorted(p.stem for p in (ROOT / "circuitkd").glob("*.py") if p.stem != "__init__")
    packages = sorted(p.name for p in (ROOT / "circuitkd").iterdir() if (p / "__init__.py").exists())
    missing = [m for m in modules if f"{m}.py" not in text] + [p for p in packages if f"{p}/" not in text]
    assert not missing, f"docs/architecture.md does not place {missing}"
