"""Streaming batches for the benchmarks: timed pulls and timed batch loops.

Every benchmark that reads batches (the pipeline stages, the loader comparison, the GPU section)
times them through here, so warm-up, device synchronisation, repetitions and the data-wait
fraction are measured one way. Endless loader streams are :func:`loaders.endless_batches`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, TypeVar

import torch

from bench.timing import Measurement, measure

T = TypeVar("T")


def pull(stream: Iterator[T]) -> tuple[T, float]:
    """The next item of ``stream`` and the seconds spent waiting for it."""
    start = time.perf_counter()
    item = next(stream)
    return item, time.perf_counter() - start


def time_batches(name: str, one_batch: Callable[[], float], *, batch_size: int, warmup: int, iters: int,
                 repeats: int, device: torch.device | None = None) -> tuple[Measurement, float]:
    """Warm up, then time ``repeats`` repetitions of ``iters`` calls of ``one_batch``.

    Args:
        name: label of the measurement.
        one_batch: processes one batch of ``batch_size`` images and returns the seconds it
            waited for data (0.0 when the data was already in memory).
        batch_size: images per batch.
        warmup: untimed calls first (worker start-up, pipeline build, kernel selection).
        iters: calls per timed repetition.
        repeats: timed repetitions (the measurement keeps each one's seconds).
        device: synchronised before and after each repetition.

    Returns:
        The measurement and the fraction of the timed seconds spent waiting for data.
    """
    for _ in range(warmup):
        one_batch()
    waits: list[float] = []

    def repetition() -> None:
        waits.append(sum(one_batch() for _ in range(iters)))

    measurement = measure(name, repetition, items=iters * batch_size, warmup=0, repeats=repeats, device=device)
    return measurement, min(1.0, sum(waits) / sum(measurement.seconds))


def time_stream(name: str, stream: Iterator[Any], **timing: Any) -> tuple[Measurement, float, Any]:
    """:func:`time_batches` of pulling batches from ``stream``; also returns the last batch pulled.

    Args:
        name: label of the measurement.
        stream: endless batches (see :func:`loaders.endless_batches`).
        **timing: ``batch_size``, ``warmup``, ``iters``, ``repeats``, ``device`` of :func:`time_batches`.
    """
    last: list[Any] = [None]

    def one_batch() -> float:
        last[0], waited = pull(stream)
        return waited

    measurement, wait = time_batches(name, one_batch, **timing)
    return measurement, wait, last[0]
