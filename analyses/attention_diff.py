"""Layer x head shortcut attention in teacher and student, and the change per matched head.

Usage: python analyses/attention_diff.py RUN_DIR [--out figures] [--pair plain]
"""
import sys

from circuitkd.run.figures import main

if __name__ == "__main__":
    sys.exit(main("attention_diff"))
