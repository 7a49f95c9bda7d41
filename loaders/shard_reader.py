"""Reading shards: one shard's samples through webdataset's own tar stages, and the shuffle buffer.

Every reader of shard bytes goes through :func:`shard_samples` (the PyTorch backend, ``ecomaug
embed`` and ``eval``): the stream is opened by :func:`loaders.remote.open_shard` (a local regular
file, an fsspec URL, a typed ``pipe:``), cut into members by webdataset's ``tar_file_expander``
and grouped by :func:`group_samples`: webdataset's rule (consecutive members sharing a key),
except that a key written twice in a row keeps its first copy and names the repeat, as DALI's
index reader does, instead of failing the rest of the shard. :func:`parse_meta` is the one
reading of a sample's ``.json`` for both backends, so they skip the same samples for the same
reason. :func:`shuffle_samples` is webdataset's ``shuffle`` stage with a seeded generator.
"""

from __future__ import annotations

import json
import random
import tarfile
from typing import Any, Iterable, Iterator, Sequence

from loaders.remote import open_shard, store_error

# What reading a broken shard raises: tarfile's errors, I/O errors (a missing object, a
# truncated stream), and ValueError (a non-regular file).
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)
REPEATED = "__repeated__"  # in a sample: the names of the members of a repeated key, left out
MAX_JSON_DEPTH = 64  # deeper metadata is refused: copying it (a DataLoader's convert) recurses


class SampleProblem(ValueError):
    """Why one sample cannot be used (its message is the reason both loaders record)."""


def repeated_reason(names: Sequence[str]) -> str:
    """The reason recorded for a key written twice in a row (the first copy is read)."""
    return f"its key is written twice in a row; the first copy is read, the repeat ({', '.join(names)}) is not"


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= MAX_JSON_DEPTH:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_meta(data: bytes | None, key: str) -> dict[str, Any]:
    """A sample's ``.json`` as its metadata: a JSON object in UTF-8 (no ``.json``: ``{}``), with
    ``key`` set to the sample's key unless it names one.

    Raises:
        SampleProblem: not UTF-8, not JSON, not an object, or nested deeper than
            :data:`MAX_JSON_DEPTH` levels; the message names ``<key>.json``.
    """
    if data is None:
        return {"key": key}
    name = f"{key}.json"
    try:
        meta = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise SampleProblem(f"{name} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise SampleProblem(f"{name} is not valid JSON ({error.msg} at line {error.lineno} "
                            f"column {error.colno})") from None
    except RecursionError:  # the parser's own limit (~1000 levels), met before ours
        raise SampleProblem(f"{name} nests deeper than {MAX_JSON_DEPTH} levels") from None
    if _depth(meta) > MAX_JSON_DEPTH:
        raise SampleProblem(f"{name} nests deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(meta, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(meta), "a number")
        raise SampleProblem(f"{name} is not a JSON object (it is {kind})")
    meta.setdefault("key", key)
    return meta


def group_samples(members: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """webdataset's ``group_by_keys`` (consecutive members sharing a key make a sample, suffixes
    lower-cased), except that a member whose suffix the sample already holds -- its key written
    twice in a row -- is left out and named under :data:`REPEATED`, where webdataset raises and
    loses the rest of the shard."""
    from webdataset.tariterators import base_plus_ext

    current: dict[str, Any] | None = None
    for member in members:
        if member == {}:  # the end of a shard
            if current is not None:
                yield current
            current = None
            continue
        prefix, suffix = base_plus_ext(member["fname"])
        if prefix is None:
            continue
        suffix = suffix.lower()
        if current is None or prefix != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": prefix, "__url__": member["__url__"]}
        if suffix in current:
            current.setdefault(REPEATED, []).append(member["fname"])
        else:
            current[suffix] = member["data"]
    if current is not None:
        yield current


def first_line(error: BaseException) -> str:
    """The first line of an error's own message (webdataset appends the stream to ``args``)."""
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
    else:
        text = str(error.args[0]) if error.args else ""
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard, in tar order: ``{"__key__": key, "jpg": bytes, ...}``.

    The stream is opened by :func:`loaders.remote.open_shard` (regular local files, fsspec
    URLs, a typed ``pipe:``) and grouped into samples by :func:`group_samples` (a repeated key:
    the first copy, and the repeat's member names under :data:`REPEATED`).

    Raises:
        tarfile.TarError, OSError, EOFError, ValueError: the shard cannot be read (lazily, as
            the samples are read).
    """
    from webdataset.tariterators import tar_file_expander  # imports torch: only here

    try:
        stream = open_shard(url)
    except (OSError, ValueError, ImportError):
        raise
    except Exception as error:  # noqa: BLE001 -- a store's own exception: this shard is unreadable
        raise store_error(url, error) from error
    try:
        yield from group_samples(tar_file_expander([{"url": url, "stream": stream}]))
    finally:
        stream.close()


def shuffle_samples(samples: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """``samples`` through webdataset's shuffle buffer of ``buffer_size`` (0 or 1: unchanged).

    The buffer fills to ``buffer_size`` before the first sample leaves, and ``rng`` (seeded by the
    caller from seed, epoch, rank and worker) makes the order the same on every run.
    """
    if buffer_size <= 1:
        yield from samples
        return
    import webdataset

    yield from webdataset.shuffle(buffer_size, initial=buffer_size, rng=rng)(iter(samples))
