"""Reading shards: one shard's samples through webdataset's own tar stages, and the shuffle buffer.

Every reader of shard bytes goes through :func:`shard_samples` (the PyTorch backend, ``ecomaug
embed`` and ``eval``): the stream is opened by :func:`loaders.remote.open_shard` (a local regular
file, an fsspec URL, a typed ``pipe:``) and cut into samples by webdataset's
``tar_file_expander`` and ``group_by_keys``, so members are grouped by webdataset's rule
(consecutive members sharing a key; a repeated member is an error). :func:`shuffle_samples` is
webdataset's ``shuffle`` stage with a seeded generator.
"""

from __future__ import annotations

import random
import tarfile
from typing import Any, Iterable, Iterator

from loaders.remote import open_shard, store_error

# What reading a broken shard raises: tarfile's errors, I/O errors (a missing object, a
# truncated stream), and ValueError (webdataset on a duplicate member, a non-regular file).
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


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
    URLs, a typed ``pipe:``) and grouped into samples by webdataset's tar stages.

    Raises:
        tarfile.TarError, OSError, EOFError, ValueError: the shard cannot be read (lazily, as
            the samples are read).
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander  # imports torch: only here

    try:
        stream = open_shard(url)
    except (OSError, ValueError, ImportError):
        raise
    except Exception as error:  # noqa: BLE001 -- a store's own exception: this shard is unreadable
        raise store_error(url, error) from error
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
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
