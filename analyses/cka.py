"""Linear CKA between teacher and student residual streams, layer by layer.

Usage: python analyses/cka.py RUN_DIR [--out figures] [--pair plain]
"""
import sys

from circuitkd.run.figures import main

if __name__ == "__main__":
    sys.exit(main("cka"))
