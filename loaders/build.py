"""``build_loader``: check the options once, pick a backend (DALI or PyTorch) and build it.

Also the two helpers every caller of a loader needs: :func:`choose_backend` (which backend
``auto`` means here) and :func:`endless_batches` (batches across epoch boundaries). How many
batches an epoch holds is :func:`loaders.sharding.epoch_plan`, which builds no loader.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch

from loaders.batch import Batch
from loaders.manifest import ShardSet
from loaders.options import BACKENDS, LoaderOptions, make_options

__all__ = ["BACKENDS", "Loader", "LoaderOptions", "build_loader", "choose_backend", "dali_available",
           "endless_batches", "make_options"]

logger = logging.getLogger(__name__)


class Loader(Protocol):
    """What :func:`build_loader` returns, whatever the backend."""

    backend: str
    corrupt: list[tuple[str, str, str]]  # (shard, key, reason) of every sample left out so far

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...

    @property
    def corrupt_count(self) -> int: ...


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported here."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(backend: str, device: torch.device | str, shard_set: ShardSet | None = None) -> str:
    """Resolve ``backend`` to ``"dali-gpu"``, ``"dali-cpu"`` or ``"torch"`` and log why.

    The one place that decides which backend runs: :func:`build_loader`, the training engine
    and the benchmarks all call it, so they agree.

    ``auto`` takes DALI with ``mixed`` (GPU) decode when the device is CUDA and DALI is
    installed, DALI on the CPU when only DALI is, and the PyTorch backend otherwise (also for
    remote shards, which DALI cannot read). ``dali`` is DALI decoding where the device is;
    ``dali-gpu`` insists on ``mixed`` decode (a CUDA device); ``dali-cpu`` runs DALI's CPU
    graph whatever the device (the views are then copied to it).

    Raises:
        ValueError: an unknown backend, DALI asked for but not installed or given URLs, or
            ``dali-gpu`` with a device that is not CUDA.

    Args:
        backend: one of :data:`~loaders.options.BACKENDS`.
        device: where the views land.
        shard_set: the shards to read (None: taken to be local files).

    Returns:
        ``"dali-gpu"``, ``"dali-cpu"`` or ``"torch"``.
    """
    device = torch.device(device)
    all_local = shard_set is None or shard_set.all_local
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dali_kind = "dali-gpu" if device.type == "cuda" else "dali-cpu"
    if backend == "torch":
        logger.info("loader backend: torch (asked for)")
        return "torch"
    if backend in ("dali", "dali-gpu", "dali-cpu"):
        if backend == "dali-gpu" and device.type != "cuda":
            raise ValueError(f"backend='dali-gpu' decodes on a CUDA device (DALI mixed decode) but the "
                             f"device is {device}; use a CUDA device, or backend='dali-cpu' or 'torch'")
        if not dali_available():
            raise ValueError(f"backend={backend!r} needs NVIDIA DALI: pip install nvidia-dali-cuda120 "
                             "(or nvidia-dali-cuda130), or use backend='torch'")
        if not all_local:
            remote = next(s.url for s in shard_set.shards if not s.is_local)
            raise ValueError(f"the DALI backend reads local files only, got {remote!r}; copy the "
                             f"shards to a local disk or use backend='torch' for URLs")
        chosen = dali_kind if backend == "dali" else backend
        logger.info("loader backend: %s (asked for)", chosen)
        return chosen
    if not all_local:
        logger.info("loader backend: torch (auto: remote shards, DALI needs local files)")
        return "torch"
    if dali_available():
        logger.info("loader backend: %s (auto: DALI installed, device %s)", dali_kind, device)
        return dali_kind
    logger.info("loader backend: torch (auto: DALI not installed)")
    return "torch"


def build_loader(shards: str | os.PathLike | Sequence[str | os.PathLike] | ShardSet, *,
                 backend: str = "auto", device: torch.device | str, batch_size: int,
                 views: int = 2, crop_size: int = 224, scale: Sequence[float] = (0.2, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), seed: int = 0, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, start_batch: int = 0, drop_last: bool = True,
                 shuffle_buffer: int = 1000, num_workers: int | None = None,
                 corrupt: str = "skip", mode: str = "train",
                 epoch_samples: int | None = None, dali_variant: str | None = None) -> Loader:
    """Build the loader of one epoch on one rank: shards in, batches of uint8 views out.

    Args:
        shards: a shard directory, ``manifest.json``, ``.tar``, brace pattern, URL
            (``s3://``, ``gs://``, ``https://``, ``pipe:``; PyTorch backend only), a list of
            these, or a :class:`~loaders.ShardSet`.
        backend: ``"auto"``, ``"dali"``, ``"dali-gpu"``, ``"dali-cpu"`` or ``"torch"`` (see
            :func:`choose_backend`).
        device: where the views land (``cuda:k`` gives DALI ``mixed`` decode on GPU ``k``).
        batch_size: samples per batch on this rank.
        views: independently cropped views of every image (eval: always 1).
        crop_size: side ``S`` of the square views.
        scale: range of the crop's area as a fraction of the image (random resized crop).
        ratio: range of the crop's aspect ratio.
        seed: run seed; the shard order of an epoch uses ``seed + epoch``.
        rank: this process's rank.
        world_size: number of ranks; ranks read disjoint parts of every epoch.
        epoch: which epoch to load (shard order and random crops depend on it).
        start_batch: skip this many batches of the epoch (resume); the rest are the batches an
            uninterrupted run would have yielded (see docs for each backend's guarantee).
        drop_last: drop incomplete batches; every rank then yields the same number of batches.
        shuffle_buffer: samples in the shuffle buffer (0 or 1: no sample shuffle).
        num_workers: PyTorch DataLoader workers / DALI threads (None: one per core, at most 8).
        corrupt: ``"skip"`` (skip and count in ``loader.corrupt_count``) or ``"raise"``
            (raise naming the shard and key).
        mode: ``"train"`` or ``"eval"`` (one view, resize shorter side + centre crop, shards in
            order, no shuffle, no drop: every sample exactly once).
        epoch_samples: samples in one epoch over all ranks, for remote shards whose counts are
            unknown (the manifest's ``totals.written``); ignored when counts are known.
        dali_variant: the DALI graph (``"decode_once"``, ``"crop_decode"`` or, on CPU,
            ``"torch_crops"``); None takes the measured default of the device
            (:data:`loaders.dali_backend.DEFAULT_VARIANT`). Ignored by the PyTorch backend.

    Returns:
        A loader with ``len(loader)`` (batches this rank yields), ``loader.backend``
        (``"dali-gpu"``, ``"dali-cpu"`` or ``"torch"``), ``loader.corrupt_count`` and
        ``loader.corrupt`` (``(shard, key, reason)`` of each sample left out); iterating it yields
        :class:`~loaders.Batch`.

    Shape:
        - each of ``batch.views``: :math:`(N, 3, S, S)` uint8 on ``device`` (contiguous, or
          channels_last in memory where the crops are resized on the CPU by torch).

    Raises:
        ValueError: a bad option, remote shards with DALI, unknown counts without
            ``epoch_samples``, a local ``.idx`` that does not match its tar, a shard set that
            lists a tar twice, or a corrupt sample with ``corrupt="raise"``.
        FileNotFoundError: a local shard does not exist.

    Example:
        >>> loader = build_loader("shards/", device="cuda", batch_size=256, seed=0, epoch=3)
        >>> for batch in loader:  # doctest: +SKIP
        ...     first, second = batch.views
    """
    options = make_options(shards, device=device, batch_size=batch_size, views=views,
                           crop_size=crop_size, scale=scale, ratio=ratio, seed=seed, rank=rank,
                           world_size=world_size, epoch=epoch, start_batch=start_batch,
                           drop_last=drop_last, shuffle_buffer=shuffle_buffer,
                           num_workers=num_workers, corrupt=corrupt, mode=mode,
                           epoch_samples=epoch_samples)
    chosen = choose_backend(backend, options.device, options.shard_set)
    if chosen == "torch":
        from loaders.torch_backend import TorchLoader

        return TorchLoader(options)
    from loaders.dali_backend import DaliLoader

    return DaliLoader(options, variant=dali_variant, on_gpu=chosen == "dali-gpu")


def endless_batches(make_loader: Callable[[int], Iterable[Batch]], *, start_epoch: int = 0) -> Iterator[Batch]:
    """Batches epoch after epoch, without end: ``make_loader(epoch)`` is built per epoch.

    Loaders are built per epoch (the shard order and the crops depend on it), so this is how a
    benchmark or a step-budgeted job reads past an epoch's end.

    Args:
        make_loader: ``epoch -> loader`` (for example a ``functools.partial`` of
            :func:`build_loader` taking ``epoch=``).
        start_epoch: the first epoch built.

    Yields:
        The batches of epoch ``start_epoch``, then of the next, and so on.

    Raises:
        ValueError: an epoch yields no batch (fewer samples than one batch), which would
            otherwise loop forever.
    """
    epoch = start_epoch
    while True:
        produced = 0
        for batch in make_loader(epoch):
            produced += 1
            yield batch
        if produced == 0:
            raise ValueError(f"epoch {epoch} yielded no batch: the shards hold fewer samples than one "
                             f"batch per rank; lower the batch size")
        epoch += 1
