"""The one exception type circuitkd raises for bad input.

Messages name what is wrong and where: the shape that failed, the site that does not
exist, the key that is missing, in the manner of einops' errors.
"""
from __future__ import annotations


class CircuitKDError(ValueError):
    """Bad input to circuitkd: a shape, length, label count, file, name or model it cannot use."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`CircuitKDError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CircuitKDError(message)
