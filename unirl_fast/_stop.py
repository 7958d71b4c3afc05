"""Stopping a thread's long loops from another thread: a reward chunk that fails while the next chunk rolls out, or
a trainer that fails while the next step's rollout runs beside it.

    flag = StopFlag()
    with watching(flag):          # in the thread that runs the loops
        ... check() ...           # at every decode step, sampler step and micro-batch: raises flag's error once set
    flag.set(err)                 # from any thread: the watching thread raises `err` at its next check()

Why a flag and not a signal: Python delivers signals (and `_thread.interrupt_main`) only to the main thread, only
between bytecodes, and a library trainer may run on any thread. A check costs one thread-local read (and one
attribute read while something watches); the rollout engines, the reference pass and the loss loop call it once per
step or micro-batch, so a failure elsewhere stops the watching thread within one decode step, sampler step or
micro-batch, before any weight changes.
"""
from __future__ import annotations

import contextlib
import threading

_local = threading.local()


class StopFlag:
    """An exception to raise in the threads that watch this flag; the first one set wins."""

    def __init__(self):
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def set(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error

    def raise_if_set(self) -> None:
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def watching(flag: StopFlag):
    """Within the block, check() in this thread raises flag's error once it is set (blocks nest: the innermost
    flag is watched)."""
    prev = getattr(_local, "flag", None)
    _local.flag = flag
    try:
        yield flag
    finally:
        _local.flag = prev


def check() -> None:
    """Raise the watched flag's error when another thread has set it; nothing otherwise."""
    flag = getattr(_local, "flag", None)
    if flag is not None and flag.error is not None:
        raise flag.error
