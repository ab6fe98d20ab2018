"""Robustness before and after KD: teacher, KD student and student alone, per debiasing method (OOD and worst-group accuracy).

Usage: python analyses/robustness.py RUN_DIR [--out figures] [--pair plain]
"""
import sys

from circuitkd.run.figures import main

if __name__ == "__main__":
    sys.exit(main("robustness"))
