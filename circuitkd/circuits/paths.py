"""Which path a circuit method takes: the hook-free native one where the model allows it (the
default), or the hooked ``patched_forward`` every backbone supports.

The hooked path is the slow reference the native one is checked against; :func:`hooked_only`
forces it for the code run inside it (a context variable, so nothing global is left changed and
concurrent threads keep their own choice)::

    with circuits.hooked_only():
        reference = circuits.discover(model, pairs, method="exact")
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

_HOOKED_ONLY: ContextVar[bool] = ContextVar("circuitkd_hooked_only", default=False)


@contextmanager
def hooked_only() -> Iterator[None]:
    """Run every circuit method on the hooked path inside the block (source values, reader
    gradients, edge runners): the reference the native paths are tested against."""
    token = _HOOKED_ONLY.set(True)
    try:
        yield
    finally:
        _HOOKED_ONLY.reset(token)


def native_allowed() -> bool:
    """False inside :func:`hooked_only`."""
    return not _HOOKED_ONLY.get()
