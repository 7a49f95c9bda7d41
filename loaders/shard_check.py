"""Find the JPEGs in a local shard that DALI's decoders would fail on, before DALI reads it.

A DALI decoder that meets one corrupt JPEG fails the whole batch and offers no per-sample skip
(NVIDIA/DALI#3913), so the DALI backend checks its shards when a loader is built and leaves the
corrupt samples out of a filtered copy of the index. The check is structural
(:func:`loaders.convert.jpeg_structure.jpeg_problem`: the segment chain from SOI to EOI, the frame
header, and the marker codes in the entropy-coded data), but it reads every byte of the shard,
which for millions of images is the whole dataset. So a result is remembered:

* in the process (:func:`check_shard` is cached by path, size and modification time), so the
  loader built for each epoch checks nothing again;
* on disk, one small JSON per shard under :func:`cache_dir` (``$ECOMAUG_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/ecomaug`` or ``~/.cache/ecomaug``), keyed by the shard's and index's path,
  size and modification time and by :data:`CHECK_VERSION`, so a later run, or another rank
  that reaches the shard later, reads no JPEG. A rewritten shard is checked again; a cache that
  cannot be written is skipped with one warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from loaders.atomic import write_json_atomic
from loaders.dali_index import IndexSample, read_samples
from loaders.convert.jpeg_structure import jpeg_problem

logger = logging.getLogger(__name__)

# Bump when jpeg_problem changes what it finds: old cache entries are ignored. 2: the segment
# structure is parsed (v1 scanned header segments too and flagged valid JPEGs 255, 511 or 767 px
# wide), data after the EOI is allowed, a zero-sized frame is found.
CHECK_VERSION = 2
CACHE_ENV = "ECOMAUG_CACHE_DIR"
__all__ = ["CHECK_VERSION", "cache_dir", "check_shard", "jpeg_problem"]


def cache_dir() -> Path:
    """Where shard check results are kept between runs (see the module docs)."""
    if os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ecomaug"
    return root / "shard-checks"


def _find_corrupt(tar: str, samples: list[IndexSample]) -> list[tuple[str, str]]:
    corrupt = []
    with open(tar, "rb") as stream:
        for sample in samples:
            image = sample.member("jpg", "jpeg")
            if image is None:
                corrupt.append((sample.key, "no .jpg member"))
                continue
            stream.seek(image.offset)
            problem = jpeg_problem(stream.read(image.size))
            if problem is not None:
                corrupt.append((sample.key, problem))
    return corrupt


def _cache_file(tar: str, index: str, size: int, mtime_ns: int) -> Path:
    index_stat = os.stat(index)
    identity = "|".join(str(part) for part in (
        CHECK_VERSION, os.path.abspath(tar), size, mtime_ns,
        os.path.abspath(index), index_stat.st_size, index_stat.st_mtime_ns))
    return cache_dir() / f"{hashlib.sha256(identity.encode()).hexdigest()[:40]}.json"


def _read_cache(path: Path, tar: str) -> list[tuple[str, str]] | None:
    try:
        payload: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("tar") != os.path.abspath(tar):
        return None
    return [(str(key), str(reason)) for key, reason in payload.get("corrupt", [])]


@functools.lru_cache(maxsize=1)
def _warn_unwritable(directory: str, error: str) -> None:
    logger.warning("cannot keep shard checks in %s (%s); every run checks its shards again; "
                   "set %s to a writable folder", directory, error, CACHE_ENV)


@functools.lru_cache(maxsize=65536)
def _check_shard_cached(tar: str, index: str, size: int, mtime_ns: int
                        ) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    # size and mtime_ns key both caches: a rewritten shard is checked again
    samples = read_samples(index)
    cache_file = _cache_file(tar, index, size, mtime_ns)
    corrupt = _read_cache(cache_file, tar)
    if corrupt is None:
        corrupt = _find_corrupt(tar, samples)
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cache_file, {"format": "ecomaug-shard-check", "version": CHECK_VERSION,
                                           "tar": os.path.abspath(tar), "samples": len(samples),
                                           "corrupt": [list(item) for item in corrupt]})
        except OSError as error:
            _warn_unwritable(str(cache_file.parent), f"{type(error).__name__}: {error}")
    bad = {key for key, _ in corrupt}
    kept = tuple(sample.line for sample in samples if sample.key not in bad)
    return kept, tuple(corrupt)


def check_shard(tar: str, index: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Check every JPEG of a local shard through its DALI index (remembered, see the module docs).

    Returns:
        The index lines of the sound samples and ``(key, reason)`` of the corrupt ones.
    """
    stat = os.stat(tar)
    kept, corrupt = _check_shard_cached(str(tar), str(index), stat.st_size, stat.st_mtime_ns)
    return list(kept), list(corrupt)

