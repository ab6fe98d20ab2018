"""Teacher-student head matching by pattern similarity, as a bipartite plot.

Usage: python analyses/head_matching.py RUN_DIR [--out figures] [--pair plain]
"""
import sys

from circuitkd.run.figures import main

if __name__ == "__main__":
    sys.exit(main("head_matching"))
