"""The ``circuitkd`` command line: ``circuitkd run [--config F] [--quick] [--out DIR]``.

Subcommands are argparse subparsers, so other commands can be added beside ``run``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from circuitkd.errors import CircuitKDError


def _run(args: argparse.Namespace) -> int:
    from circuitkd.experiment import load_config, run_experiment

    cfg = load_config(args.config, quick=args.quick, workers=args.workers, device=args.device)
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = run_experiment(cfg, out)
    print(f"{out / 'summary.md'}  ({summary['wall_seconds']:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuitkd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the distillability experiment grid",
                         description="Train teachers (plain and debiased) and their students, evaluate them, "
                                     "and write a run folder with results and a markdown summary. "
                                     "Re-running with the same --out resumes an interrupted run.")
    run.add_argument("--config", help="experiment config JSON (default: the one shipped with circuitkd)")
    run.add_argument("--quick", action="store_true", help="smoke-run preset: one seed, few steps, small task")
    run.add_argument("--out", help="run folder (default: runs/<name>-<timestamp>)")
    run.add_argument("--workers", type=int, help="parallel training processes (overrides the config)")
    run.add_argument("--device", help="'auto', 'cpu' or 'cuda' (overrides the config)")
    run.set_defaults(func=_run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CircuitKDError as exc:
        print(f"circuitkd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
