"""The run's records: ``RUN/metrics.jsonl`` (appended, so a resumed run continues it) and TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

# Events written at many steps become TensorBoard charts; the others (start, resume, held_out,
# interrupted, end) are one point each and go to the text tab instead.
CHARTED_EVENTS = ("train", "knn")


class MetricsLog:
    """JSONL metrics and, when tensorboard is installed, TensorBoard scalars and text.

    Args:
        run_dir: the run directory (``metrics.jsonl`` and ``tensorboard/`` go there).
        enabled: False on every rank but rank 0: nothing is written.
    """

    def __init__(self, run_dir: Path, *, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tensorboard = None

    def write(self, event: str, **values: Any) -> None:
        """Append one record ``{"event": event, "time": ..., **values}``."""
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **values}
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
        if self.tensorboard is None:
            return
        step = values.get("step", 0)
        if event in CHARTED_EVENTS:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
                    self.tensorboard.add_scalar(f"{event}/{name}", value, step)
        else:
            rows = "\n".join(f"| {name} | {json.dumps(value)} |" for name, value in values.items())
            self.tensorboard.add_text(event, f"| field | value |\n|---|---|\n{rows}", step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
