"""The three fixes (augmentation, iterative KD, teacher initialisation) against plain KD from the same teacher.

Usage: python analyses/fixes.py RUN_DIR [--out figures] [--pair plain]
"""
import sys

from circuitkd.run.figures import main

if __name__ == "__main__":
    sys.exit(main("fixes"))
