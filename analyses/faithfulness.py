"""Faithfulness curves of the teacher's and the student's circuits over circuit size (CPR, CMD).

Usage: python analyses/faithfulness.py RUN_DIR [--out figures] [--pair plain]
"""
import sys

from circuitkd.run.figures import main

if __name__ == "__main__":
    sys.exit(main("faithfulness"))
