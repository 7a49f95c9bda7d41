"""Stop at a step boundary on SIGTERM/SIGINT (a scheduler's preemption), abort on a second one."""

from __future__ import annotations

import signal
import threading
from typing import Any

from ecomaug.engine.errors import TrainingAborted


class StopSignals:
    """SIGTERM/SIGINT set a flag that the loop reads at a step boundary; a second one aborts at once.

    Schedulers send SIGTERM before they preempt a job, so the first signal must not kill the run
    in the middle of a step: the loop saves a checkpoint where it is and stops. Handlers are only
    installed in the main thread, and a signal the parent set to be ignored (SIGINT in a shell's
    background job) stays ignored. Used as a context manager; the old handlers come back on exit.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                previous = signal.getsignal(number)
                if previous is not signal.SIG_IGN:
                    self._previous[number] = previous
                    signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def _handle(self, signal_number: int, frame: Any) -> None:
        if self.received is not None:
            raise TrainingAborted(signal_number)
        self.received = signal_number
