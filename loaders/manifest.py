"""The shard set on disk: ``manifest.json`` and how a loader finds shards and their counts.

Shard format (``ecomaug-shards`` version 1), written by ``ecomaug shard``:

* ``{prefix}-{NNNNNN}.tar`` WebDataset shards; each sample is ``<key>.jpg`` (RGB JPEG) and
  ``<key>.json`` (metadata: ``key``, ``source``, ``width``, ``height`` and any manifest columns
  such as ``item_id``, ``region``, ``shop``, ``title``). Keys contain no dots.
* ``{prefix}-{NNNNNN}.idx`` beside each tar: a DALI index file for
  ``fn.readers.webdataset(index_paths=...)``.
* ``manifest.json`` (or ``manifest-*.json``, one per job of a split conversion): format,
  versions, options used, per-shard ``count`` and ``bytes``, per-group counts and totals.
* ``skipped.jsonl``: one line per input that was not written, with the reason.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

FORMAT_NAME = "ecomaug-shards"
FORMAT_VERSION = 1
REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "http://", "https://", "pipe:", "hf://", "az://")


@dataclass(frozen=True)
class ShardInfo:
    """One shard: where its tar is, its DALI index (if local) and how many samples it holds."""

    url: str
    index_path: str | None
    count: int | None
    bytes: int | None = None

    @property
    def is_local(self) -> bool:
        return not self.url.startswith(REMOTE_PREFIXES)


@dataclass(frozen=True)
class ShardSet:
    """An ordered list of shards and, where known, the number of samples in all of them."""

    shards: tuple[ShardInfo, ...]
    manifests: tuple[dict[str, Any], ...] = field(default=())

    @property
    def num_samples(self) -> int | None:
        """Total samples, or None when any shard's count is unknown."""
        counts = [shard.count for shard in self.shards]
        return None if any(count is None for count in counts) else sum(counts)  # type: ignore[arg-type]

    @property
    def all_local(self) -> bool:
        return all(shard.is_local for shard in self.shards)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename, so readers never see half."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(payload, stream, indent=2, sort_keys=False)
            stream.write("\n")
        os.chmod(temporary, 0o644)  # mkstemp makes owner-only files; results are for everyone
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check one ``manifest.json``.

    Raises:
        ValueError: if the file is not an ecomaug shard manifest of a known version.
    """
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not an {FORMAT_NAME} manifest (missing 'format': '{FORMAT_NAME}')")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: manifest format_version {manifest.get('format_version')!r} is not "
                         f"supported (this ecomaug reads version {FORMAT_VERSION})")
    return manifest


def _shards_from_manifest(manifest: dict[str, Any], directory: Path) -> list[ShardInfo]:
    shards = []
    for entry in manifest["shards"]:
        index = entry.get("index")
        shards.append(ShardInfo(url=str(directory / entry["tar"]),
                                index_path=str(directory / index) if index else None,
                                count=int(entry["count"]), bytes=entry.get("bytes")))
    return shards


def _count_from_index(index_path: Path) -> int:
    # A DALI index starts with "v1.2 <number of samples>" (or a bare count in old versions).
    with open(index_path, encoding="utf-8") as stream:
        first = stream.readline().split()
    if not first:
        raise ValueError(f"{index_path}: empty DALI index file")
    return int(first[-1]) if first[0].startswith("v") else int(first[0])


def _local_shard(path: Path) -> ShardInfo:
    if not path.is_file():
        raise FileNotFoundError(2, "No such shard", str(path))
    index = path.with_suffix(".idx")
    count = _count_from_index(index) if index.is_file() else None
    return ShardInfo(url=str(path), index_path=str(index) if index.is_file() else None,
                     count=count, bytes=path.stat().st_size)


def load_shard_set(source: str | os.PathLike | Sequence[str | os.PathLike]) -> ShardSet:
    """Resolve what a user passed as ``--data``/``--shards`` into a :class:`ShardSet`.

    Args:
        source: a directory written by ``ecomaug shard`` (all ``manifest*.json`` in it are
            merged, so the output of a split ``--num-jobs`` conversion reads as one set); a
            ``manifest.json`` path; a ``.tar`` path or brace pattern
            (``shards/shard-{000000..000009}.tar``); a remote URL (``s3://``, ``gs://``,
            ``https://``, ``pipe:``) or a list of any of these.

    Returns:
        The shards in a stable order. Local tars without a manifest take their counts from
        their ``.idx`` file when present; remote shards have ``count=None``.

    Raises:
        FileNotFoundError: a local path does not exist.
        ValueError: a directory holds no manifest and no shards, or a manifest is malformed.
    """
    if isinstance(source, (list, tuple)):
        parts = [load_shard_set(item) for item in source]
        if not parts:
            raise ValueError("no shards given (an empty list)")
        return ShardSet(shards=tuple(s for part in parts for s in part.shards),
                        manifests=tuple(m for part in parts for m in part.manifests))
    text = os.fspath(source)
    if text.startswith(REMOTE_PREFIXES):
        import braceexpand

        return ShardSet(shards=tuple(ShardInfo(url=url, index_path=None, count=None)
                                     for url in braceexpand.braceexpand(text)))
    if "{" in text:
        import braceexpand

        return load_shard_set([path for path in braceexpand.braceexpand(text)])
    path = Path(text)
    if path.is_dir():
        manifest_paths = sorted(path.glob("manifest*.json"))
        if manifest_paths:
            manifests = [read_manifest(p) for p in manifest_paths]
            shards = [s for m in manifests for s in _shards_from_manifest(m, path)]
            return ShardSet(shards=tuple(shards), manifests=tuple(manifests))
        tars = sorted(path.glob("*.tar"))
        if not tars:
            raise ValueError(f"{path}: no manifest.json and no .tar shards in this directory")
        return ShardSet(shards=tuple(_local_shard(t) for t in tars))
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    if path.suffix == ".json":
        return ShardSet(shards=tuple(_shards_from_manifest(read_manifest(path), path.parent)),
                        manifests=(read_manifest(path),))
    return ShardSet(shards=(_local_shard(path),))


def iter_skipped(directory: str | os.PathLike) -> Iterable[dict[str, Any]]:
    """Yield the records of every ``skipped*.jsonl`` in a shard directory."""
    for path in sorted(Path(directory).glob("skipped*.jsonl")):
        with open(path, encoding="utf-8") as stream:
            for line in stream:
                if line.strip():
                    yield json.loads(line)
