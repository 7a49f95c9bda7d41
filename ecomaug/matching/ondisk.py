"""An IVF index whose inverted lists stay in a file on disk (``match --index-on-disk``).

As faiss's ``demos/demo_ondisk_ivf.py`` does: the trained, empty index is copied once per chunk of
the database, each copy gets one chunk and is written out as a shard, and
``faiss.contrib.ondisk.merge_ondisk`` merges the shards' lists (read memory-mapped) into one
``.ivfdata`` file beside the index: the database is never indexed in memory at once. The index
file keeps only the coarse quantizer, the OPQ rotation, the PQ tables and each list's offset; it is
read back with ``IO_FLAG_ONDISK_SAME_DIR`` (the lists file is looked for beside it, so the output
folder can move), and faiss maps the lists file, so the OS pages in the lists a query probes
instead of reading them all into RAM.

The index file names its lists file but holds no checksum of it, and faiss maps whatever file it
finds (a shorter one is a crash on the first probe, not an error). So the lists file's size and a
digest of samples of it are recorded when it is written, and checked before it is read.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

LISTS_SUFFIX = ".ivfdata"
# The digest reads this many evenly spaced blocks of this size (4 MiB in all, whatever the file's
# size): another index's lists differ in every block, and a 10 GB file is not read whole each run.
DIGEST_BLOCKS, DIGEST_BLOCK_BYTES = 64, 64 * 1024
# faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY: the lists beside the index, never written.
READ_FLAGS = ("IO_FLAG_ONDISK_SAME_DIR", "IO_FLAG_READ_ONLY")


def lists_path(index_path: Path) -> Path:
    """The lists file of the index saved at ``index_path`` (``b.faiss`` -> ``b.ivfdata``)."""
    return index_path.with_suffix(LISTS_SUFFIX)


def lists_digest(path: Path) -> str:
    """A sha1 of ``path``'s size and ``DIGEST_BLOCKS`` evenly spaced blocks of it."""
    size = path.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    step = max(DIGEST_BLOCK_BYTES, size // DIGEST_BLOCKS)
    with open(path, "rb") as file:
        for offset in range(0, size, step):
            file.seek(offset)
            digest.update(file.read(DIGEST_BLOCK_BYTES))
    return digest.hexdigest()


def lists_record(path: Path) -> dict[str, Any]:
    """What the index's ``.json`` records of its lists file: ``lists_file`` (its name),
    ``lists_bytes`` and ``lists_digest``."""
    return {"lists_file": path.name, "lists_bytes": path.stat().st_size, "lists_digest": lists_digest(path)}


def add_on_disk(trained: Any, vectors: np.ndarray, lists_file: Path, *, chunk: int, name: str) -> Any:
    """``trained`` (an empty IVF index, possibly behind an OPQ rotation) filled with ``vectors``,
    its lists written to ``lists_file`` (replaced if there), ``chunk`` rows indexed at a time.

    Args:
        trained: the trained, empty index; it becomes the returned index.
        vectors: the database rows, float32; row ``i`` gets id ``i``.
        lists_file: where the inverted lists go.
        chunk: rows indexed in memory at a time (one shard).
        name: the index's name, for the progress bar.

    Returns:
        ``trained``, its lists now ``faiss.OnDiskInvertedLists`` over ``lists_file``.
    """
    import faiss  # the caller has checked it is there (ecomaug.matching.index.faiss_module)
    from faiss.contrib.ondisk import merge_ondisk
    from tqdm.auto import tqdm

    count = vectors.shape[0]
    lists_file = lists_file.resolve()
    lists_file.parent.mkdir(parents=True, exist_ok=True)
    lists_file.unlink(missing_ok=True)
    shard_dir = Path(tempfile.mkdtemp(prefix=".shards-", dir=lists_file.parent))
    try:
        shards = []
        with tqdm(total=count, desc=f"add to {name} on disk", unit="vec", unit_scale=True, leave=False,
                  disable=count <= chunk) as bar:
            for start in range(0, count, chunk):
                shard = faiss.clone_index(trained)
                rows = vectors[start:start + chunk]
                # explicit ids: merge_ondisk's shift_ids shifts by the wrong amount (measured with faiss 1.15.1)
                shard.add_with_ids(rows, np.arange(start, start + len(rows), dtype=np.int64))
                shards.append(str(shard_dir / f"{len(shards)}.faiss"))
                faiss.write_index(shard, shards[-1])
                del shard
                bar.update(len(rows))
        merge_ondisk(trained, shards, str(lists_file))
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)
    return trained


def read_on_disk(saved: Path, recorded: dict[str, Any]) -> Any:
    """The on-disk index saved at ``saved``, its lists mapped from the file beside it.

    Args:
        saved: the index file.
        recorded: its ``.json`` (:func:`lists_record`'s keys).

    Raises:
        ValueError: the lists file is missing, or is not the one written with this index (one line).
    """
    import faiss

    lists = saved.parent / str(recorded.get("lists_file", lists_path(saved).name))
    if not lists.is_file():
        raise ValueError(f"{saved} keeps its inverted lists in {lists}, which is missing: restore it, or delete "
                         f"{saved} to rebuild the index")
    if (lists.stat().st_size != recorded.get("lists_bytes")
            or lists_digest(lists) != recorded.get("lists_digest")):
        raise ValueError(f"{lists} is not the lists file written with {saved} (its size or contents differ): "
                         f"restore that one, or delete {saved} to rebuild the index")
    flags = 0
    for flag in READ_FLAGS:
        flags |= getattr(faiss, flag)
    return faiss.read_index(str(saved), flags)
