"""The run's records: ``RUN/metrics.jsonl`` (appended, so a resumed run continues it) and TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

# Events written at many steps become TensorBoard charts (a nested record such as train's
# per-augmentation "fired" shares becomes train/fired/NAME); the others (start, resume, held_out,
# interrupted, end) are one point each and go to the text tab, held_out's recalls to charts too.
CHARTED_EVENTS = ("train", "knn")
SCALAR_EVENTS = (*CHARTED_EVENTS, "held_out")


class MetricsLog:
    """JSONL metrics and, when tensorboard is installed, TensorBoard scalars and text.

    Args:
        run_dir: the run directory (``metrics.jsonl`` and ``tensorboard/`` go there).
        enabled: False on every rank but rank 0: nothing is written.
    """

    def __init__(self, run_dir: Path, *, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard_dir = run_dir / "tensorboard"
        self.tensorboard: Any = None
        self._purge_step: int | None = None
        self._opened = False  # the TensorBoard writer is made at the first record (see resume)

    def resume(self, step: int, **values: Any) -> None:
        """Write the ``resume`` record of a run continued from its checkpoint at ``step``.

        A run killed after that checkpoint (SIGKILL, a power cut) had logged steps that the resumed
        run does again: their records are dropped, from ``metrics.jsonl`` (rewritten atomically, with
        any torn last line) and from TensorBoard (its ``purge_step``), so that each step appears once.
        """
        if self.enabled and self.path.is_file():
            from loaders.atomic import write_atomic

            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if (logged := _step_of(line)) is not None and logged <= step]
            write_atomic(self.path, lambda stream: stream.write("".join(f"{line}\n" for line in kept).encode()))
        self._purge_step = step + 1
        self.write("resume", step=step, **values)

    def write(self, event: str, **values: Any) -> None:
        """Append one record ``{"event": event, "time": ..., **values}``."""
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **values}
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
        if not self._opened:
            self._opened = True
            self.tensorboard = _summary_writer(self.tensorboard_dir, self._purge_step)
        if self.tensorboard is None:
            return
        step = values.get("step", 0)
        if event in SCALAR_EVENTS:
            for name, value in _scalars(values):
                self.tensorboard.add_scalar(f"{event}/{name}", value, step)
        if event not in CHARTED_EVENTS:
            rows = "\n".join(f"| {name} | {json.dumps(value)} |" for name, value in values.items())
            self.tensorboard.add_text(event, f"| field | value |\n|---|---|\n{rows}", step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _scalars(values: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """The numbers of a record as ``(name, value)``, nested dicts flattened to ``outer/inner``; no step."""
    found: list[tuple[str, float]] = []
    for name, value in values.items():
        if isinstance(value, dict):
            found += _scalars(value, f"{prefix}{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
            found.append((f"{prefix}{name}", value))
    return found


def _step_of(line: str) -> int | None:
    """The step of one ``metrics.jsonl`` line (0 for a record without one); None for a torn line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    return step if isinstance(step, int) else 0


def _summary_writer(folder: Path, purge_step: int | None) -> Any:
    """TensorBoard's writer into ``folder``, hiding events from ``purge_step`` on; None without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)
