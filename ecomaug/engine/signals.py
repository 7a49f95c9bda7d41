"""Stop at a step boundary on SIGTERM/SIGINT (a scheduler's preemption), abort on a second one."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

from ecomaug.distributed import all_reduce_mean, is_distributed
from ecomaug.engine.errors import TrainingAborted


class StopSignals:
    """SIGTERM/SIGINT set a flag that the loop reads at a step boundary; a second one aborts at once.

    Schedulers send SIGTERM before they preempt a job, so the first signal must not kill the run
    in the middle of a step: the loop saves a checkpoint where it is and stops. Handlers are only
    installed in the main thread, and a signal the parent set to be ignored (SIGINT in a shell's
    background job) stays ignored. Used as a context manager; the old handlers come back on exit,
    and a signal noted but never acted on (the block ended normally) is raised again then.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.aborted = False  # a second signal raised TrainingAborted: both were acted on
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
        installed, self._previous = self._previous, {}
        if exc_info[0] is None and self.received in installed and not self.aborted:
            # The signal came after the loop's last look (the run's last moments): deliver it again
            # to the restored handler (SIGINT: KeyboardInterrupt; SIGTERM: the default, an exit), so
            # that a stop request never ends in exit code 0.
            signal.raise_signal(self.received)

    def requested(self, device: torch.device, *, agree: bool = True) -> bool:
        """Whether a stop signal arrived, on this rank or (under DDP) on any.

        Args:
            device: where this rank's tensors live (the all-reduce under DDP runs there).
            agree: under DDP, ask every rank (a collective: each rank must call it at the same
                point); False answers no without a collective, for steps that are no sync point.
        """
        if not is_distributed():
            return self.received is not None
        if not agree:
            return False
        flag = torch.tensor(float(self.received is not None), device=device)
        return float(all_reduce_mean(flag)) > 0

    def _handle(self, signal_number: int, frame: Any) -> None:
        if self.received is not None:
            self.aborted = True
            raise TrainingAborted(signal_number)
        self.received = signal_number
