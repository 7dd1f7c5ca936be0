"""Stops (Ctrl-C, SIGTERM) that take effect at a safe point: shared by ``medfast train`` and ``medfast bench``."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Terminated", "signals_deferred"]


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and ``timeout`` send), raised as Ctrl-C raises KeyboardInterrupt: a
    command stops the same way for both."""


@contextlib.contextmanager
def signals_deferred(deliver: bool = True) -> Iterator[None]:
    """Ctrl-C / SIGTERM arriving inside the block are delivered when it ends (main thread only), or dropped with
    ``deliver=False``. Raised inside torch.save's writes to a Python file, they surfaced as torch's write error
    ("unexpected pos"), so a scheduler's stop during a checkpoint ended the run as a failed write (exit 1) instead
    of a clean stop after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, Any]] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda signum, frame: pending.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for signum, frame in pending[:1] if deliver else ():  # the first one, to its own handler (one stop is enough)
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler in (signal.SIG_DFL, None):
                signal.raise_signal(signum)
