"""Honest timing shared by every benchmark: warm-up, device sync, repetitions, median and spread."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


@dataclass
class Measurement:
    """Throughput of one stage over several repetitions."""

    name: str
    items_per_repeat: int
    seconds: list[float]

    @property
    def rates(self) -> list[float]:
        return [self.items_per_repeat / s for s in self.seconds]

    @property
    def median_rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) of the per-repetition rates."""
        return min(self.rates), max(self.rates)

    @property
    def ms_per_repeat(self) -> float:
        return 1000.0 * statistics.median(self.seconds)

    def as_dict(self) -> dict[str, Any]:
        low, high = self.spread
        return {**asdict(self), "median_per_s": self.median_rate, "min_per_s": low,
                "max_per_s": high, "ms_per_repeat": self.ms_per_repeat}


def measure(name: str, step: Callable[[], Any], *, items: int, warmup: int = 2, repeats: int = 5,
            device: torch.device | str | None = None) -> Measurement:
    """Time ``step()`` ``repeats`` times after ``warmup`` untimed calls.

    Args:
        name: label of the stage.
        step: one unit of work; it processes ``items`` items.
        items: items processed by one call (images, batches x batch size, ...).
        warmup: untimed calls first (compilation, caches, worker start-up).
        repeats: timed calls; report the median and the spread.
        device: synchronised before and after each timed call.
    """
    if repeats < 1 or warmup < 0 or items < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, items >= 1 (got {repeats}, {warmup}, {items})")
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return Measurement(name=name, items_per_repeat=items, seconds=seconds)


def conditions(device: torch.device | str | None = None) -> dict[str, Any]:
    """The facts a reader needs to compare two benchmark runs."""
    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu_name": cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else "cpu",
    }
    if device is not None and torch.device(device).type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    for module in ("torchvision", "kornia", "timm", "webdataset", "PIL", "nvidia.dali"):
        try:
            info[module] = __import__(module, fromlist=["__version__"]).__version__
        except Exception:  # not installed or no version attribute: say so rather than fail
            info[module] = None
    return info


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()
