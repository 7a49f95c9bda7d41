"""How a training run can stop early: a non-finite loss, out of memory, a stop signal."""

from __future__ import annotations

import signal
from pathlib import Path


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint was kept."""


class OutOfMemoryError(RuntimeError):
    """A batch did not fit in the device's (or the host's) memory."""


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError ("can't allocate memory")."""
    import torch  # here, so that the command line can name these errors without importing torch

    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped the run at a step boundary, after saving a checkpoint there."""

    def __init__(self, signal_number: int, step: int, checkpoint: Path | None) -> None:
        self.signal_number, self.step, self.checkpoint = signal_number, step, checkpoint
        name = signal.Signals(signal_number).name
        saved = (f"checkpoint {checkpoint}; continue with --resume auto" if checkpoint is not None
                 else "no step done, nothing to save")
        super().__init__(f"stopped by {name} at step {step}: {saved}")

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended (130, 143)."""
        return 128 + self.signal_number


class TrainingAborted(BaseException):
    """A second stop signal arrived before the first one's checkpoint was written: stop at once.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that no ``except Exception`` swallows it.
    """

    def __init__(self, signal_number: int) -> None:
        self.signal_number = signal_number
        super().__init__(f"aborted by a second {signal.Signals(signal_number).name}: nothing more "
                         f"was saved (the run's earlier checkpoints are intact)")
