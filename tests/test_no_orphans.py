"""Issue 16: worker processes die with their driver (no orphans after a SIGKILL)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DRIVER = r"""
import multiprocessing as mp, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from circuitkd.run.jobs import _worker_init

if __name__ == "__main__":
    with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn"),
                             initializer=_worker_init, initargs=(1,)) as pool:
        futures = [pool.submit(time.sleep, 300) for _ in range(2)]
        pids = set()
        while len(pids) < 2:
            pids = {p.pid for p in pool._processes.values()}
            time.sleep(0.1)
        time.sleep(1.0)  # let the initializers (and their watchdogs) start
        print(" ".join(map(str, sorted(pids))), flush=True)
        time.sleep(300)
"""


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        state = next(line for line in status.read_text().splitlines() if line.startswith("State:"))
    except (FileNotFoundError, StopIteration, ProcessLookupError):
        return False
    return " Z " not in state and "zombie" not in state


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_sigkill_of_the_driver_leaves_no_worker_behind(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = driver.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids), line
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
        # A worker still importing circuitkd when its driver dies notices once its initializer runs; on a
        # loaded machine that import alone can take over 10 s. Without the watchdog they would live 300 s.
        deadline = time.monotonic() + 60
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in pids if _alive(p)]
        for p in left:  # do not leave them behind even when the test fails
            os.kill(p, signal.SIGKILL)
        assert not left, f"workers {left} outlived their SIGKILLed driver"
    finally:
        if driver.poll() is None:
            driver.kill()
