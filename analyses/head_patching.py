"""Head activation patching maps of the shortcut contrast, teacher vs student.

Usage: python analyses/head_patching.py RUN_DIR [--out figures] [--pair plain]
"""
import sys

from circuitkd.run.figures import main

if __name__ == "__main__":
    sys.exit(main("head_patching"))
