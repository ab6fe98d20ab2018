"""The code the README and docs/ show runs exactly as shown, so an example can never silently break.

Every ```python block of README.md and docs/**/*.md runs, in order, in one fresh Python process
per file (later blocks may use names from earlier ones), in an empty working folder. The only
change from a reader's run is the environment: ``CIRCUITKD_SMOKE=1`` cuts the default training
budget (``TrainCfg().steps``) to a few steps, so training code runs end to end in seconds.
Tracebacks name the Markdown file and its line numbers.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from circuitkd.config import SMOKE_ENV

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)

# Executes each block compiled under the Markdown file's name, padded so line numbers match it.
RUNNER = """
import json, sys
path, blocks = sys.argv[1], json.loads(sys.argv[2])
namespace = {"__name__": "__main__"}
for line, code in blocks:
    exec(compile("\\n" * (line - 1) + code, path, "exec"), namespace)
"""


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line of the block's first code line, code)`` for each ```python block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def test_the_readme_shows_python_that_uses_circuitkd():
    blocks = python_blocks(ROOT / "README.md")
    assert blocks, "no ```python block found in README.md: has the fence changed?"
    assert any("import circuitkd" in code for _, code in blocks)


def test_blocks_are_found_with_their_line_numbers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# t\n\n```python\nx = 1\n```\n\n```bash\nls\n```\n```python\ny = x\nz = y\n```\n")
    lines = doc.read_text().splitlines()
    blocks = python_blocks(doc)
    assert blocks == [(4, "x = 1\n"), (11, "y = x\nz = y\n")]
    assert [lines[n - 1] for n, _ in blocks] == ["x = 1", "y = x"]


@pytest.mark.parametrize("path", [p for p in DOCS if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run_as_shown(path, tmp_path):
    env = {**os.environ, SMOKE_ENV: "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(path), json.dumps(python_blocks(path))],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{path.name}'s Python does not run as shown:\n{proc.stderr[-6000:]}", pytrace=False)
