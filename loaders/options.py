"""The checked options of one loader: what every backend reads, validated once (no backend imported)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from loaders.manifest import ShardSet, load_shard_set

BACKENDS = ("auto", "dali", "dali-gpu", "dali-cpu", "torch")
CORRUPT_POLICIES = ("skip", "raise")
MODES = ("train", "eval")


@dataclass(frozen=True)
class LoaderOptions:
    """The checked options every backend reads (see :func:`build_loader` for their meaning)."""

    shard_set: ShardSet
    device: torch.device
    batch_size: int
    views: int
    crop_size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    seed: int
    rank: int
    world_size: int
    epoch: int
    start_batch: int
    drop_last: bool
    shuffle_buffer: int
    num_workers: int
    corrupt: str
    mode: str
    epoch_samples: int | None

    @property
    def shuffle(self) -> bool:
        return self.mode == "train"


def _check_range(name: str, value: Sequence[float], *, low: float, high: float | None) -> tuple[float, float]:
    if len(value) != 2 or not low <= value[0] <= value[1] or (high is not None and value[1] > high):
        allowed = f"{low} <= min <= max" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be a (min, max) pair with {allowed}, got {tuple(value)!r}")
    return float(value[0]), float(value[1])


def make_options(shards: str | os.PathLike | Sequence[str | os.PathLike] | ShardSet, *,
                 device: torch.device | str, batch_size: int, views: int = 2, crop_size: int = 224,
                 scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 seed: int = 0, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 start_batch: int = 0, drop_last: bool = True, shuffle_buffer: int = 1000,
                 num_workers: int | None = None, corrupt: str = "skip", mode: str = "train",
                 epoch_samples: int | None = None) -> LoaderOptions:
    """Check the arguments of :func:`build_loader` and resolve the shard set; raise ValueError."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if corrupt not in CORRUPT_POLICIES:
        raise ValueError(f"corrupt must be one of {CORRUPT_POLICIES}, got {corrupt!r}")
    for name, value, minimum in (("batch_size", batch_size, 1), ("views", views, 1),
                                 ("crop_size", crop_size, 8), ("epoch", epoch, 0),
                                 ("start_batch", start_batch, 0), ("shuffle_buffer", shuffle_buffer, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise ValueError(f"num_workers must be None (one per core) or an integer >= 0, got {num_workers!r}")
    if epoch_samples is not None and (not isinstance(epoch_samples, int) or epoch_samples < 1):
        raise ValueError(f"epoch_samples must be None or an integer >= 1, got {epoch_samples!r}")
    scale = _check_range("scale", scale, low=0.0, high=1.0)
    ratio = _check_range("ratio", ratio, low=0.0, high=None)
    if scale[1] <= 0 or ratio[0] <= 0:
        raise ValueError(f"scale and ratio must be positive, got scale={scale}, ratio={ratio}")
    shard_set = shards if isinstance(shards, ShardSet) else load_shard_set(shards)
    if not shard_set.shards:
        raise ValueError("the shard set is empty")
    if mode == "eval":
        # Embedding and the kNN monitor need every sample once, in a fixed order, seen whole.
        views, drop_last = 1, False
    return LoaderOptions(
        shard_set=shard_set, device=torch.device(device), batch_size=batch_size, views=views,
        crop_size=crop_size, scale=scale, ratio=ratio, seed=int(seed), rank=rank,
        world_size=world_size, epoch=epoch, start_batch=start_batch, drop_last=bool(drop_last),
        shuffle_buffer=shuffle_buffer,
        num_workers=min(os.cpu_count() or 1, 8) if num_workers is None else num_workers,
        corrupt=corrupt, mode=mode, epoch_samples=epoch_samples)
