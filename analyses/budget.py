"""Distillability against the student's training budget: the kept fraction of the teacher's OOD gain, with 95% intervals.

Usage: python analyses/budget.py RUN_DIR [--out figures]
"""
import sys

from circuitkd.run.figures import main

if __name__ == "__main__":
    sys.exit(main("budget"))
