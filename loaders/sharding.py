"""Which samples each rank reads in an epoch: shard permutation, rank split, batch count, resume.

Both backends follow the same plan, so they agree on what a rank sees:

* the shard order is permuted each epoch with ``random.Random(seed + epoch)`` (eval: kept);
* the samples of the shards, concatenated in that order, are split into ``world_size``
  contiguous ranges, rank ``r`` taking ``[N*r // W, N*(r+1) // W)`` -- the formula DALI's
  readers use for ``shard_id``/``num_shards``, so the DALI reader needs no extra bookkeeping;
* with ``drop_last`` every rank yields ``(N // W) // batch_size`` batches (the smallest rank's
  full batches), so DDP ranks never wait on each other; without it a rank yields
  ``ceil(its samples / batch_size)`` batches and every sample is seen exactly once.

:func:`epoch_plan` is the public entry: the plan of a shard set from its manifest counts,
without building a loader (the training engine sizes its schedule with it).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
import os
from typing import Sequence

from loaders.manifest import ShardSet, load_shard_set

FOREVER = 1 << 62  # the stop of a segment whose sample count is unknown: read the whole shard


@dataclass(frozen=True)
class Segment:
    """A run of consecutive samples ``[start, stop)`` of one shard that a rank reads."""

    shard: int
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class EpochPlan:
    """What one rank reads in one epoch.

    Attributes:
        shard_order: indices into the shard list, in the order this epoch visits them (the
            same on every rank).
        segments: this rank's samples, in stream order.
        num_samples: samples this rank reads (the sum of the segment counts).
        num_batches: batches this rank yields in this epoch (``len(loader)`` before resume).
    """

    shard_order: tuple[int, ...]
    segments: tuple[Segment, ...]
    num_samples: int
    num_batches: int


def shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order in which an epoch visits the shards: a permutation drawn with ``seed + epoch``."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(seed + epoch).shuffle(order)
    return order


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[start, stop)`` of ``total`` samples (DALI's split)."""
    return total * rank // world_size, total * (rank + 1) // world_size


def check_rank(rank: int, world_size: int) -> None:
    """Raise ValueError unless ``0 <= rank < world_size``."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")


def plan_epoch(counts: Sequence[int], *, batch_size: int, seed: int, epoch: int, rank: int,
               world_size: int, drop_last: bool, shuffle: bool) -> EpochPlan:
    """Plan one rank's epoch over shards holding ``counts`` samples each.

    Args:
        counts: samples per shard, in the shard list's order.
        batch_size: samples per batch.
        seed: run seed; the shard order uses ``seed + epoch``.
        epoch: epoch number (0-based).
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: number of ranks reading disjoint parts.
        drop_last: drop incomplete batches and give every rank the same number of batches.
        shuffle: permute the shard order (False keeps the stored order, as eval does).

    Returns:
        The :class:`EpochPlan`.

    Raises:
        ValueError: bad rank/world size/batch size, or ``drop_last`` leaves a rank no batch.
    """
    check_rank(rank, world_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    order = shard_order(len(counts), seed=seed, epoch=epoch, shuffle=shuffle)
    total = sum(counts)
    start, stop = rank_range(total, rank, world_size)
    segments = []
    offset = 0
    for shard in order:
        low, high = max(start, offset), min(stop, offset + counts[shard])
        if low < high:
            segments.append(Segment(shard=shard, start=low - offset, stop=high - offset))
        offset += counts[shard]
    num_samples = stop - start
    if drop_last:
        num_batches = (total // world_size) // batch_size
        if num_batches == 0:
            raise ValueError(f"drop_last leaves rank {rank} no batch: {total} samples over "
                             f"{world_size} rank(s) is fewer than batch_size={batch_size} per rank; "
                             f"lower batch_size or pass drop_last=False")
    else:
        num_batches = math.ceil(num_samples / batch_size)
    return EpochPlan(shard_order=tuple(order), segments=tuple(segments), num_samples=num_samples,
                     num_batches=num_batches)


def plan_unknown_counts(num_shards: int, *, epoch_samples: int | None, batch_size: int, seed: int,
                        epoch: int, rank: int, world_size: int, drop_last: bool, shuffle: bool,
                        unknown: str = "a shard") -> EpochPlan:
    """Plan an epoch over shards whose counts are unknown (remote tars without a manifest).

    Ranks take whole shards round robin and read them again as often as needed to fill a
    nominal epoch of ``epoch_samples`` samples over all ranks (segments end at :data:`FOREVER`).

    Raises:
        ValueError: ``epoch_samples`` is None, fewer shards than ranks, or no batch per rank.
    """
    check_rank(rank, world_size)
    if epoch_samples is None:
        raise ValueError(f"sample count of {unknown!r} is unknown (remote shard or no .idx): pass "
                         f"epoch_samples=N (the manifest's totals.written) or give the manifest")
    if num_shards < world_size:
        raise ValueError(f"{num_shards} shard(s) with unknown counts cannot be split over "
                         f"{world_size} ranks; need at least one shard per rank")
    order = shard_order(num_shards, seed=seed, epoch=epoch, shuffle=shuffle)
    per_rank = epoch_samples // world_size
    if drop_last:
        num_batches = per_rank // batch_size
        if num_batches == 0:
            raise ValueError(f"epoch_samples={epoch_samples} over {world_size} rank(s) "
                             f"is fewer than batch_size={batch_size} per rank")
    else:
        num_batches = math.ceil(per_rank / batch_size)
    return EpochPlan(shard_order=tuple(order),
                     segments=tuple(Segment(shard=s, start=0, stop=FOREVER) for s in order[rank::world_size]),
                     num_samples=per_rank, num_batches=num_batches)


def epoch_plan(shards: str | os.PathLike | Sequence[str | os.PathLike] | ShardSet, *, batch_size: int,
               rank: int = 0, world_size: int = 1, epoch: int = 0, seed: int = 0,
               mode: str = "train", drop_last: bool = True,
               epoch_samples: int | None = None) -> EpochPlan:
    """The plan of one rank's epoch, from the manifest counts alone: no loader, no temp folder.

    ``plan.num_batches`` is ``len(build_loader(...))`` for the same arguments (before
    ``start_batch``), and the same for every epoch. In training the PyTorch backend keeps that
    length when it meets corrupt samples (stand-ins); the DALI backend leaves out the samples its
    shard check finds corrupt, so it may yield up to ``ceil(corrupt / (world_size * batch_size))``
    batches fewer.

    Args:
        shards: what :func:`loaders.load_shard_set` reads, or a :class:`~loaders.ShardSet`.
        batch_size: samples per batch on this rank.
        rank: this process's rank.
        world_size: number of ranks.
        epoch: which epoch (the shard order depends on it; the batch count does not).
        seed: run seed.
        mode: ``"train"`` or ``"eval"`` (eval: stored order, no drop, as the loaders read it).
        drop_last: drop incomplete batches (train only; eval never drops).
        epoch_samples: samples per epoch over all ranks when the counts are unknown.

    Returns:
        The :class:`EpochPlan`.

    Raises:
        ValueError: a bad option, an empty shard set, or unknown counts without ``epoch_samples``.

    Example:
        >>> steps_per_epoch = epoch_plan("shards/", batch_size=64).num_batches  # doctest: +SKIP
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    shard_set = shards if isinstance(shards, ShardSet) else load_shard_set(shards)
    if not shard_set.shards:
        raise ValueError("the shard set is empty")
    shuffle, drop_last = mode == "train", bool(drop_last) and mode == "train"
    counts = [shard.count for shard in shard_set.shards]
    arguments = dict(batch_size=batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                     drop_last=drop_last, shuffle=shuffle)
    if all(count is not None for count in counts):
        return plan_epoch(counts, **arguments)  # type: ignore[arg-type]
    unknown = next(shard.url for shard in shard_set.shards if shard.count is None)
    return plan_unknown_counts(len(counts), epoch_samples=epoch_samples, unknown=unknown, **arguments)


def check_start_batch(start_batch: int, num_batches: int) -> None:
    """Raise ValueError unless ``0 <= start_batch <= num_batches``."""
    if not isinstance(start_batch, int) or not 0 <= start_batch <= num_batches:
        raise ValueError(f"start_batch must be in [0, {num_batches}] (batches in this epoch), "
                         f"got {start_batch!r}")


def split_for_workers(segments: Sequence[Segment], num_workers: int) -> list[list[Segment]]:
    """Deal a rank's segments to ``num_workers`` loader workers, round robin, in order."""
    parts: list[list[Segment]] = [[] for _ in range(max(1, num_workers))]
    for position, segment in enumerate(segments):
        parts[position % len(parts)].append(segment)
    return parts


def merged_chunk_order(chunks_per_worker: Sequence[int]) -> list[tuple[int, int]]:
    """The order in which a DataLoader hands over the workers' chunks: ``(worker, chunk)``.

    A PyTorch DataLoader over an iterable dataset takes one item from each worker in turn and
    skips workers that are done, so worker ``w``'s ``k``-th chunk comes in round ``k``.
    """
    order = []
    for round_index in range(max(chunks_per_worker, default=0)):
        for worker, count in enumerate(chunks_per_worker):
            if round_index < count:
                order.append((worker, round_index))
    return order


def derive_seed(*parts: int | str) -> int:
    """A 31-bit seed from several parts (seed, epoch, rank, ...), the same on every run.

    ``random.Random`` hashes a string seed with SHA-512, so nearby inputs give unrelated seeds
    (``seed=1, epoch=0`` and ``seed=0, epoch=1`` do not collide here, unlike ``seed + epoch``).
    """
    return random.Random("/".join(str(part) for part in parts)).getrandbits(31)
