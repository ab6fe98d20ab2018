"""Teacher vs student circuits: shared, lost and new edges.

Usage: python analyses/circuits.py RUN_DIR [--out figures] [--pair plain]
"""
import sys

from circuitkd.run.figures import main

if __name__ == "__main__":
    sys.exit(main("circuits"))
