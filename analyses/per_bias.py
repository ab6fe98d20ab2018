"""Per bias type: OOD accuracy where each shortcut conflicts, teacher vs KD student, per method.

Usage: python analyses/per_bias.py RUN_DIR [--out figures] [--pair plain]
"""
import sys

from circuitkd.run.figures import main

if __name__ == "__main__":
    sys.exit(main("per_bias"))
