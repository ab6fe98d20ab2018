"""Teacher and student attention patterns on one bias-conflicting example, shortcut tokens marked.

Usage: python analyses/attention_patterns.py RUN_DIR [--out figures] [--pair plain]
"""
import sys

from circuitkd.run.figures import main

if __name__ == "__main__":
    sys.exit(main("attention_patterns"))
