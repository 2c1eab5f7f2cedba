"""Ctrl-C and SIGTERM stop training at a step boundary, so the checkpoint they leave is exact.

A signal raising KeyboardInterrupt wherever it lands would leave a half-done step: its Gumbel noise or gate
samples already drawn, so a checkpoint of the previous step would hold a random state that an uninterrupted
run never had, and the resumed run would diverge. Instead the first SIGINT or SIGTERM only records the
request; the trainer finishes the step in progress, checkpoints it and stops. A second signal raises
KeyboardInterrupt at once for a user who will not wait; the trainer then rewinds (see prune.training.trainer).
SIGTERM is how schedulers preempt and how background jobs, which often ignore SIGINT, are stopped. A signal
the process ignores stays ignored; off the main thread, where Python cannot handle signals, nothing changes.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """`signal` names the first SIGINT/SIGTERM received (None: none yet); a second one raises KeyboardInterrupt."""

    def __init__(self):
        self.signal: str | None = None

    def handle(self, signum: int, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping mid-step")
        self.signal = signal.Signals(signum).name


@contextmanager
def stop_at_step_boundary() -> Iterator[StopRequest]:
    """Within the block SIGINT and SIGTERM set `request.signal` instead of raising; the previous handlers are
    back afterwards."""
    request = StopRequest()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, request.handle)
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
