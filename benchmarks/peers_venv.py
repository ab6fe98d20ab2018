"""Create the virtual environment the auto-circuit peer runs in (see benchmarks/peers.py).

auto-circuit 1.0.1 needs TransformerLens 2.x, which cannot share an environment with
circuitkd's transformer-lens 4.x, so it gets its own venv, built from the lock file that pins a
set known to install and run on this kind of machine. torch goes in first (the CPU wheel of the
same version circuitkd runs on), then the lock.

    python benchmarks/peers_venv.py                      # -> benchmarks/.peers-venv
    python benchmarks/peers_venv.py --venv /work/peers-venv --lock ../shared/peers/auto-circuit.lock

Idempotent: an existing venv whose auto_circuit and transformer_lens import is left alone.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE / ".peers-venv"
DEFAULT_LOCK = HERE.parent.parent / "shared" / "peers" / "auto-circuit.lock"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ready(venv: Path) -> bool:
    """True when the venv exists and imports the peer's packages."""
    py = venv_python(venv)
    if not py.exists():
        return False
    probe = "import auto_circuit, transformer_lens, torch; print(torch.__version__)"
    return subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0


def create(venv: Path, lock: Path, torch_spec: str) -> Path:
    """Build the venv (python -m venv, torch, then the lock); return its python."""
    if not lock.is_file():
        raise SystemExit(f"lock file not found: {lock} (pass --lock)")
    if ready(venv):
        print(f"{venv}: ready")
        return venv_python(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + [torch_spec], check=True)
    subprocess.run(pip + ["-r", str(lock)], check=True)
    if not ready(venv):
        raise SystemExit(f"{venv}: built, but auto_circuit / transformer_lens do not import")
    print(f"{venv}: ready")
    return venv_python(venv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--lock", type=Path, default=DEFAULT_LOCK)
    ap.add_argument("--torch", default="torch==2.13.0", help="torch requirement installed before the lock")
    args = ap.parse_args()
    create(args.venv, args.lock, args.torch)


if __name__ == "__main__":
    main()
