"""Issue 16, item 3: a re-run of a finished run folder verifies every finished model.

A byte flipped inside a model file that no remaining job loads (a student at the end of the
grid) leaves ``torch.load`` happy; only the checkpoint's manifest (sha256 per file) notices.
The re-run must retrain that model alone, bit for bit, and end with the same results.
"""
import json
import shutil

import torch

from circuitkd.run.plan import load_config, plan
from circuitkd.run.runner import run_experiment
from circuitkd.models.checkpoint import WEIGHTS, is_checkpoint

VOLATILE = ("seconds", "skipped")


def _rows(run_dir):
    rows = json.loads((run_dir / "results.json").read_text())["results"]
    return {r["id"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}


def test_rerun_retrains_a_corrupt_model_it_does_not_load(quick_run, tmp_path):
    cfg = load_config(quick=True)
    jobs = plan(cfg)
    needed = {dep for job in jobs for dep in job.deps}
    leaf = next(job.id for job in reversed(jobs) if job.id not in needed)
    out = tmp_path / "quick"
    shutil.copytree(quick_run, out)
    weights = out / "models" / leaf / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, still loadable: only the manifest's sha256 tells
    weights.write_bytes(bytes(data))
    assert not is_checkpoint(out / "models" / leaf)

    logs = []
    run_experiment(cfg, out, log=logs.append)
    trained = [line for line in logs if line.startswith("[") and "cached" not in line]
    assert len(trained) == 1 and leaf in trained[0]
    assert is_checkpoint(out / "models" / leaf)
    original = torch.load(quick_run / "models" / leaf / WEIGHTS, weights_only=False)["model"]
    retrained = torch.load(weights, weights_only=False)["model"]
    assert original.keys() == retrained.keys()
    assert all(torch.equal(original[k], retrained[k]) for k in original)
    assert _rows(out) == _rows(quick_run)
    # the run says on the console what summary.md says: every missed target loudly, every thin one plainly
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["banner"], "the quick run's tiny models should miss their targets"
    assert [line for line in logs if line.startswith("⚠ UNRELIABLE: ")] == \
        [f"⚠ UNRELIABLE: {b}" for b in summary["banner"]]
    assert [line for line in logs if line.startswith("thin target: ")] == \
        [f"thin target: {t}" for t in summary["thin_targets"]]
