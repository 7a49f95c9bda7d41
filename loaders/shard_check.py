"""Find the samples of a local shard that DALI would fail on or misread, before DALI reads it.

A DALI decoder that meets one corrupt JPEG fails the whole batch and offers no per-sample skip
(NVIDIA/DALI#3913), so the DALI backend checks its shards when a loader is built and leaves the
corrupt samples out of a filtered copy of the index. The check is structural
(:func:`loaders.convert.jpeg_structure.jpeg_problem`: the segment chain from SOI to EOI, the frame
header, and the marker codes in the entropy-coded data). The same pass reads every ``.json`` as
the PyTorch backend does (:func:`loaders.shard_reader.parse_meta`: a sample whose metadata is not
a JSON object is left out with the same reason) and names the repeat of a key written twice in a
row (its first copy is kept, as the PyTorch backend keeps it). Before it, :func:`check_index`
compares the shard's ``.idx`` with all the tar's member headers (a wrong index is refused, not
read: DALI trusts its offsets). Loading a shard set does much less (:func:`index_count`, both
backends): the ``.idx`` count against the manifest's, and its first and last samples against
the tar's headers there, a few small reads; only a shard where they disagree is fully checked.
The check reads every byte of the shard, which for millions of images is the whole dataset. So
a result is remembered:

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
from loaders.dali_index import (BLOCK, IndexSample, IndexSyntaxError, check_index as check_index_against_tar,
                                 parse_count, read_samples, sample_groups, tar_members)
from loaders.convert.jpeg_structure import jpeg_problem
from loaders.remote import open_regular_file
from loaders.shard_reader import SampleProblem, parse_meta, repeated_reason

logger = logging.getLogger(__name__)

# Bump when the check changes what it finds: old cache entries are ignored. 2: the segment
# structure is parsed (v1 scanned header segments too and flagged valid JPEGs 255, 511 or 767 px
# wide), data after the EOI is allowed, a zero-sized frame is found. 3: the .json members are
# read, a repeated key is named, the index is checked against the tar.
CHECK_VERSION = 3
CACHE_ENV = "ECOMAUG_CACHE_DIR"
SPOT_BYTES = 4096  # read at each end of an .idx at load: its first line, and its first and last samples
__all__ = ["CHECK_VERSION", "cache_dir", "check_index", "check_shard", "count_samples", "index_count",
           "jpeg_problem"]


def cache_dir() -> Path:
    """Where shard check results are kept between runs (see the module docs)."""
    if os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ecomaug"
    return root / "shard-checks"


def _sample_problem(stream: Any, sample: IndexSample) -> str | None:
    # in the PyTorch backend's order: the image member, the metadata, the image bytes
    image = sample.member("jpg", "jpeg")
    if image is None:
        return "no .jpg member"
    meta = sample.member("json")
    if meta is not None:  # a sample without one is read with {"key": key}, as by the PyTorch backend
        stream.seek(meta.offset)
        try:
            parse_meta(stream.read(meta.size), sample.key)
        except SampleProblem as problem:
            return str(problem)
    stream.seek(image.offset)
    return jpeg_problem(stream.read(image.size))


def _find_corrupt(tar: str, samples: list[IndexSample]) -> list[tuple[int, str, str, bool]]:
    """``(line, key, reason, dropped)`` of every problem: a corrupt sample is dropped, the repeat
    of a key is named but its first copy is kept."""
    corrupt = []
    with open_regular_file(tar) as stream:
        for number, sample in enumerate(samples):
            if sample.repeated:
                corrupt.append((number, sample.key, repeated_reason([m.name for m in sample.repeated]), False))
            problem = _sample_problem(stream, sample)
            if problem is not None:
                corrupt.append((number, sample.key, problem, True))
    return corrupt


def _cache_file(tar: str, index: str, size: int, mtime_ns: int) -> Path:
    # one file per shard: "samples" once the index matched the tar, "corrupt" once the samples were read
    index_stat = os.stat(index)
    identity = "|".join(str(part) for part in (
        CHECK_VERSION, os.path.abspath(tar), size, mtime_ns,
        os.path.abspath(index), index_stat.st_size, index_stat.st_mtime_ns))
    return cache_dir() / f"{hashlib.sha256(identity.encode()).hexdigest()[:40]}.json"


def _read_cache(path: Path, tar: str) -> dict[str, Any] | None:
    try:
        payload: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("tar") != os.path.abspath(tar):
        return None
    return payload


def _write_cache(path: Path, payload: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, payload)
    except OSError as error:
        _warn_unwritable(str(path.parent), f"{type(error).__name__}: {error}")


@functools.lru_cache(maxsize=1)
def _warn_unwritable(directory: str, error: str) -> None:
    logger.warning("cannot keep shard checks in %s (%s); every run checks its shards again; "
                   "set %s to a writable folder", directory, error, CACHE_ENV)


@functools.lru_cache(maxsize=65536)
def _check_index_cached(tar: str, index: str, size: int, mtime_ns: int, index_size: int,
                        index_mtime_ns: int) -> int:
    # the sizes and mtimes key both caches: a rewritten shard or index is checked again
    cache_file = _cache_file(tar, index, size, mtime_ns)
    payload = _read_cache(cache_file, tar)
    if payload is not None and isinstance(payload.get("samples"), int):
        return payload["samples"]
    count = check_index_against_tar(tar, index)
    _write_cache(cache_file, {"format": "ecomaug-shard-check", "version": CHECK_VERSION,
                              "tar": os.path.abspath(tar), "samples": count})
    return count


def check_index(tar: str, index: str) -> int:
    """Check a local shard's ``.idx`` against its tar (remembered, see the module docs).

    Returns:
        The number of samples the index lists (and the tar holds).

    Raises:
        ValueError: one line naming the index and what disagrees
            (:func:`loaders.dali_index.check_index`).
    """
    stat, index_stat = os.stat(tar), os.stat(index)
    return _check_index_cached(str(tar), str(index), stat.st_size, stat.st_mtime_ns,
                               index_stat.st_size, index_stat.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _check_shard_cached(tar: str, index: str, size: int, mtime_ns: int, index_size: int, index_mtime_ns: int
                        ) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    samples = read_samples(index)
    cache_file = _cache_file(tar, index, size, mtime_ns)
    payload = _read_cache(cache_file, tar)
    try:
        corrupt = [(int(n), str(key), str(reason), bool(drop)) for n, key, reason, drop in payload["corrupt"]]
    except (TypeError, KeyError, ValueError):  # no entry, or an unreadable one: check again
        corrupt = _find_corrupt(tar, samples)
        _write_cache(cache_file, {"format": "ecomaug-shard-check", "version": CHECK_VERSION,
                                  "tar": os.path.abspath(tar), "samples": len(samples),
                                  "corrupt": [list(item) for item in corrupt]})
    dropped = {number for number, _, _, drop in corrupt if drop}
    kept = tuple(sample.first_copy_line for number, sample in enumerate(samples) if number not in dropped)
    return kept, tuple((key, reason) for _, key, reason, _ in corrupt)


def check_shard(tar: str, index: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Check a local shard through its DALI index (remembered, see the module docs): the index
    against the tar (:func:`check_index`), then every sample's ``.json`` and JPEG.

    Returns:
        The index lines of the samples to read (a repeated key: its first copy) and ``(key,
        reason)`` of every sample left out.

    Raises:
        ValueError: the index does not match the tar.
    """
    check_index(tar, index)
    stat, index_stat = os.stat(tar), os.stat(index)
    kept, corrupt = _check_shard_cached(str(tar), str(index), stat.st_size, stat.st_mtime_ns,
                                        index_stat.st_size, index_stat.st_mtime_ns)
    return list(kept), list(corrupt)


# ----------------------------------------------------------------------------- counts at load
def count_samples(tar: str | os.PathLike) -> int | None:
    """Samples in a local tar, from its member headers grouped as its index groups them; None
    when the tar cannot be read to its end (the loader reports it when it reads the shard)."""
    try:
        with open_regular_file(tar) as stream:
            members, ending = tar_members(stream)
    except (OSError, ValueError):
        return None
    return len(sample_groups(members)) if ending == "end" else None


def _first_member(line: bytes) -> tuple[int, int] | None:
    # the data offset and size of a sample line's first member (its first three fields: a
    # member name with a space later on the line does not matter here)
    fields = line.split(maxsplit=3)
    if len(fields) < 3 or not (fields[1].isdigit() and fields[2].isdigit()) or int(fields[1]) < BLOCK:
        return None
    return int(fields[1]), int(fields[2])


def _ends_agree(tar: str, head: bytes, tail: bytes) -> bool:
    """Whether the tar's headers agree with an index's first sample (its first member) and last
    sample (its first member, then nothing but its key to the end of the archive)."""
    first = _first_member(head.split(b"\n", 2)[1]) if head.count(b"\n") >= 2 else None
    lines = tail.rstrip(b"\n").rsplit(b"\n", 1)
    last = _first_member(lines[-1]) if len(lines) == 2 else None
    if first is None or last is None:
        return False
    with open_regular_file(tar) as stream:
        found, _ = tar_members(stream, start=first[0] - BLOCK, limit=1)
        if [(m.offset, m.size) for m in found] != [first]:
            return False
        found, ending = tar_members(stream, start=last[0] - BLOCK)
    return ending == "end" and bool(found) and (found[0].offset, found[0].size) == last \
        and len(sample_groups(found)) == 1


@functools.lru_cache(maxsize=1024)
def _warn_unparsable(index: str, error: str) -> None:
    logger.warning("%s; counting its shard from the tar instead (the PyTorch backend reads the tar "
                   "without it; the DALI backend refuses it)", error)


def index_count(tar: str, index: str, expected: int | None = None) -> int | None:
    """The sample count of a local shard from its ``.idx``, cheaply checked (see the module docs).

    The count on the index's first line is taken when it equals ``expected`` (the manifest's;
    None: no manifest, the number of lines the index holds) and the index's first and last
    samples agree with the tar's headers there.
    Otherwise the whole index is checked against the tar (:func:`check_index`); an index whose
    lines cannot be parsed is warned about once and the tar's own count is returned (None if the
    tar cannot be read to its end), so the PyTorch backend reads the shard (DALI's check refuses).

    Raises:
        ValueError: one line naming the index: not a DALI index, or it does not match the tar.
    """
    with open_regular_file(index) as stream:
        head = stream.read(SPOT_BYTES)
        stream.seek(max(0, os.fstat(stream.fileno()).st_size - SPOT_BYTES))
        tail = stream.read(SPOT_BYTES)
        if expected is None:  # no manifest: the index's own lines are the second opinion
            stream.seek(0)
            expected = sum(1 for line in stream if line.strip()) - 1
    declared = parse_count(head, index)
    if declared and (expected is None or declared == expected) and _ends_agree(tar, head, tail):
        return declared
    try:
        return check_index(tar, index)
    except IndexSyntaxError as error:
        _warn_unparsable(index, str(error))
        return count_samples(tar)
