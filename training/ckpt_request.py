"""A checkpoint on request: `kill -USR1 PID` makes a training process checkpoint soon.

A run's checkpoints come every `checkpoint.every_steps`; a machine that is about to go (a
preemption notice, a session's end, `s4l study --park`) wants the state of *now*. SIGUSR1 sets a
flag; the training loop checkpoints at its next logging boundary (`log_every_steps`: there the
averaged training metrics have just been written, so a resume from that step writes the same
records as an uninterrupted run) and goes on training. Under torchrun every rank learns of the
request through the logging all-reduce the loop already does, so they all save at one step.

`handling()` installs the handler for a block and restores the previous one after; a process
that runs many trainings (a study) holds it across them, so a request between two runs never
meets SIGUSR1's default action (terminate). Where signals cannot be installed (not the main
thread, no SIGUSR1 on the platform) the block runs without: checkpoints keep their schedule.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_requested = threading.Event()
SIGNAL = getattr(signal, "SIGUSR1", None)


def _handler(signum, frame) -> None:  # noqa: ARG001  (the signal module's signature)
    _requested.set()


@contextlib.contextmanager
def handling() -> Iterator[bool]:
    """SIGUSR1 requests a checkpoint inside the block; yields whether the handler is installed."""
    if SIGNAL is None:
        yield False
        return
    try:
        previous = signal.signal(SIGNAL, _handler)
    except ValueError:  # not the main thread
        yield False
        return
    try:
        yield True
    finally:
        signal.signal(SIGNAL, previous)


def requested() -> bool:
    return _requested.is_set()


def clear() -> None:
    _requested.clear()
