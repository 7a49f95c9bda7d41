"""The benchmark's stages: each arrow of tar -> bytes -> pixels -> crops -> views -> step, timed.

Every stage is measured two ways:

* **alone**: only that stage's own work, in this process, on inputs already in memory (the tar
  read alone reads the files, warm in the page cache, in one process). It answers "how fast could
  this step go if nothing else ran?".
* **cumulative**: everything from the tar files up to and including this stage, streamed the
  way training streams it (loader workers, then the device). It answers "how many images/s
  reach this point?". The loader stages run once per loader backend and once for the baseline
  (webdataset + Pillow + torchvision, see :mod:`bench.baseline`).

The training step alone, fed synthetic batches already on the device, is the model's ceiling.
A piece of the project that is not installed makes its stages *unavailable* (with the reason),
never the whole benchmark fail. This module names the stages and holds the settings and the
measured rows; :mod:`bench.runner` runs them, :mod:`bench.report` says what they mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bench.timing import Measurement

STAGES = ("read", "decode", "crops", "recipe", "train", "baseline")
BACKENDS = ("dali", "torch")
# Row titles: alone, a stage is only its own work; cumulative, it adds to the stages before it.
TITLES = {
    "alone": {"read": "tar read (bytes)", "decode": "decode", "crops": "2 random resized crops",
              "recipe": "ecom recipe (2 views)", "train": "MoCo step, synthetic batches"},
    "cumulative": {"read": "tar read (bytes)", "decode": "+ decode", "crops": "+ 2 crops (loader)",
                   "recipe": "+ ecom recipe", "train": "+ MoCo step"},
}


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how; every field is a ``bench`` command option.

    Args:
        shards: what :func:`loaders.load_shard_set` reads (directory, manifest, tar, pattern).
        device: where the recipe and the model run (and where loaders deliver).
        backends: loader backends of ``loaders.build_loader`` to compare (``dali``, ``torch``).
        stages: stages to run, a subset of :data:`STAGES`.
        batch_size: images per batch (each gives two views).
        crop_size: side of each square view.
        model: timm model name of the MoCo encoder (``pretrained=False``).
        warmup: untimed batches before each measurement (worker start-up, caches, kernels).
        iters: batches per timed repetition.
        repeats: timed repetitions; the report gives their median and spread.
        num_workers: loader workers (ours and the baseline's); None: one per core.
        queue_size: MoCo queue length K.
        amp: run the model step under bfloat16 autocast (CUDA only; training does too).
        threads: torch intra-op threads in this process during the run (None: leave as is).
        seed: seeds every random choice (crops, shuffles, synthetic batches, weights).
    """

    shards: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backends: tuple[str, ...] = BACKENDS
    stages: tuple[str, ...] = STAGES
    batch_size: int = 128
    crop_size: int = 224
    model: str = "resnet50"
    warmup: int = 3
    iters: int = 10
    repeats: int = 5
    num_workers: int | None = None
    queue_size: int = 65536
    amp: bool = True
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ValueError(f"unknown stage(s) {unknown or '(none given)'}; choose from {', '.join(STAGES)}")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise ValueError(f"unknown backend(s) {unknown or '(none given)'}; choose from {', '.join(BACKENDS)}")
        for name, low in (("batch_size", 1), ("crop_size", 8), ("iters", 1), ("repeats", 1),
                          ("warmup", 0), ("queue_size", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.queue_size < self.batch_size:
            raise ValueError(f"queue_size (MoCo K={self.queue_size}) must be >= batch_size ({self.batch_size})")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if "train" in self.stages:
            import timm

            if not timm.is_model(self.model):
                raise ValueError(f"unknown timm model {self.model!r}; see timm.list_models(), e.g. resnet50")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} requested but CUDA is not available; use --device cpu")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device}")


@dataclass
class StageResult:
    """One measured row: a stage, alone or cumulative, through one backend."""

    stage: str
    mode: str
    backend: str
    measurement: Measurement
    batch_size: int
    data_wait: float | None = None
    note: str = ""
    wall_seconds: float | None = None

    @property
    def label(self) -> str:
        title = TITLES[self.mode][self.stage]
        return f"{title} [{self.backend}]" if self.backend else title

    def as_dict(self) -> dict[str, Any]:
        low, high = self.measurement.spread
        batches = self.measurement.items_per_repeat // self.batch_size
        return {"stage": self.stage, "mode": self.mode, "backend": self.backend, "label": self.label,
                "images_per_s": {"median": self.measurement.median_rate, "min": low, "max": high},
                "ms_per_batch": self.measurement.ms_per_repeat / batches,
                "data_wait_fraction": self.data_wait, "batch_size": self.batch_size,
                "batches_per_repeat": batches, "seconds": list(self.measurement.seconds),
                "wall_seconds": self.wall_seconds, "note": self.note}


@dataclass
class Unavailable:
    """A stage that could not run here, and why (a missing module, no DALI, ...)."""

    stage: str
    mode: str
    backend: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"stage": self.stage, "mode": self.mode, "backend": self.backend, "reason": self.reason}


@dataclass
class BenchRun:
    """Everything one ``bench`` run measured, with the conditions it ran under."""

    config: BenchConfig
    conditions: dict[str, Any]
    shards: dict[str, Any]
    results: list[StageResult]
    unavailable: list[Unavailable]

    def find(self, stage: str, mode: str, backend: str | None = None) -> list[StageResult]:
        return [r for r in self.results if r.stage == stage and r.mode == mode
                and (backend is None or r.backend == backend)]
