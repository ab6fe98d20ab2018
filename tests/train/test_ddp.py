"""Data-parallel training through torchrun: 2 CPU processes (gloo) take the same steps as 1 process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.ddp_job import train

ROOT = Path(__file__).resolve().parents[2]


def _is_key_bias(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] == "bias" and ("k" in parts or "W_K" in parts or "key" in parts)


# About 20 s on two busy cores, so it runs by default (in CI too). torchrun is launched as
# ``python -m torch.distributed.run`` from this interpreter: CI calls the venv's python without
# activating it, where a PATH lookup of ``torchrun`` would find nothing and skip the test silently.
def test_two_process_gloo_matches_single_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "tests/train/ddp_job.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for objective in ("ce", "learned_mixin_h"):
        ddp = torch.load(tmp_path / f"{objective}.pt")
        assert ddp["world"] == 2
        state, losses = train(objective)
        # Same global batches and averaged gradients: equal up to float summation order.
        assert ddp["losses"] == pytest.approx(losses, abs=1e-5)
        assert set(ddp["state"]) == set(state)
        # The attention key bias has an exactly zero gradient (softmax ignores a constant shift
        # of the scores), so Adam turns float rounding noise into steps there: skip it.
        bad = {key: float((ddp["state"][key] - value).abs().max()) for key, value in state.items()
               if not _is_key_bias(key) and not torch.allclose(ddp["state"][key], value, atol=1e-5)}
        assert not bad, (objective, bad)
        # And training did move the weights (the comparison is not between two untouched models).
        assert losses[0] != pytest.approx(losses[-1], abs=1e-3)
