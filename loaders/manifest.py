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

A manifest is data: its ``tar``/``index`` entries must be plain relative names inside its
folder (a ``pipe:`` entry would be run by webdataset's shell), its structure is checked once
here for every reader, and its counts are checked against each shard's ``.idx`` (or the tar)
so a stale or edited count cannot make a loader run short or skip samples. A local ``.idx`` is
itself spot-checked against its tar's member headers, and fully checked where its count or
those headers disagree (:func:`loaders.shard_check.index_count`: a few small reads per shard,
not a scan of every tar), and a set that lists one tar twice is refused: both would change the
data every reader sees without an error. A remote folder (``s3://bucket/shards/``) is read the
same way through fsspec (:mod:`loaders.remote`; a remote ``.idx`` gives only its count).
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Sequence

from loaders.dali_index import HEAD_BYTES, parse_count
from loaders.atomic import write_json_atomic  # noqa: F401 -- re-exported: the writer of manifests
from loaders.remote import (WEBDATASET_SCHEMES, filesystem, open_regular_file, read_text,
                            register_webdataset_handlers, store_error, url_scheme)
from loaders.shard_check import count_samples, index_count

logger = logging.getLogger(__name__)

FORMAT_NAME = "ecomaug-shards"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    """One shard: where its tar is, its DALI index (if local) and how many samples it holds."""

    url: str
    index_path: str | None
    count: int | None
    bytes: int | None = None

    @property
    def is_local(self) -> bool:
        return url_scheme(self.url) is None


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


# ----------------------------------------------------------------------------- manifest schema
def check_entry_name(name: Any, *, where: str) -> str:
    """Return ``name`` if it is a plain relative file name inside the manifest's folder.

    A manifest is data, and data never chooses how it is opened: a URL scheme (``pipe:`` runs
    a shell command through webdataset, ``s3://`` reaches elsewhere), an absolute path or a
    ``..`` step would let a manifest read or run what its folder does not hold.

    Raises:
        ValueError: naming ``where`` and the entry.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where} must be a file name (a non-empty string), got {name!r}")
    posix = PurePosixPath(name)
    unsafe = (url_scheme(name) is not None or "\0" in name or "\\" in name or posix.is_absolute()
              or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive
              or ".." in posix.parts or name.startswith("~"))
    if unsafe:
        raise ValueError(f"{where} {name!r} is not a plain relative file name inside the manifest's "
                         f"folder (no URL scheme such as pipe: or s3://, no absolute path, no '..'); "
                         f"a URL is only taken from what you pass as --data yourself")
    return name


def _check_count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be an integer >= 0, got {value!r}")
    return value


def validate_manifest(manifest: Any, *, where: str) -> dict[str, Any]:
    """Check the structure of a parsed ``manifest.json`` and return it.

    Checks what the readers rely on: the format and version, ``shards`` a list of objects
    each with a safe ``tar`` name (:func:`check_entry_name`), a ``count`` >= 0, an optional
    safe ``index`` name and ``bytes``; ``totals`` (if present) an object.

    Raises:
        ValueError: one message naming ``where`` and the first field that is wrong.
    """
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{where}: not an {FORMAT_NAME} manifest (missing 'format': '{FORMAT_NAME}')")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where}: manifest format_version {manifest.get('format_version')!r} is not "
                         f"supported (this ecomaug reads version {FORMAT_VERSION})")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ValueError(f"{where}: malformed manifest: 'shards' must be a list of shard entries, "
                         f"got {type(shards).__name__} {shards!r:.60}")
    for number, entry in enumerate(shards):
        label = f"{where}: malformed manifest: shards[{number}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{label} must be an object with 'tar' and 'count', got {entry!r:.60}")
        if "tar" not in entry or "count" not in entry:
            missing = [name for name in ("tar", "count") if name not in entry]
            raise ValueError(f"{label} has no {' and no '.join(repr(m) for m in missing)}")
        check_entry_name(entry["tar"], where=f"{label}.tar")
        _check_count(entry["count"], f"{label}.count")
        if entry.get("index") is not None:
            check_entry_name(entry["index"], where=f"{label}.index")
        if entry.get("bytes") is not None:
            _check_count(entry["bytes"], f"{label}.bytes")
    if "totals" in manifest and not isinstance(manifest["totals"], dict):
        raise ValueError(f"{where}: malformed manifest: 'totals' must be an object")
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check one ``manifest.json`` (a local path or an fsspec URL such as ``s3://``).

    Only a regular file is read (a FIFO is refused rather than waited on).

    Raises:
        ValueError: not a regular file, not JSON, not an ecomaug shard manifest of a known
            version, or malformed (see :func:`validate_manifest`).
        FileNotFoundError: it does not exist.
    """
    where = os.fspath(path)
    try:
        manifest = json.loads(read_text(where))
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg} at line {error.lineno})") from error
    return validate_manifest(manifest, where=where)


# ----------------------------------------------------------------------------- counts
def _agreed_count(declared: int, found: int | None, *, tar: str, source: str, where: str) -> int:
    """The count to plan with: what the shard holds where that is known, with a warning when
    the manifest says otherwise (a loader that trusted it would silently run short or skip)."""
    if found is None or found == declared:
        return declared
    logger.warning("%s: the manifest says %s holds %d samples but %s says %d; using %d (the manifest "
                   "is stale or was edited)", where, tar, declared, source, found, found)
    return found


def _local_entry_shard(entry: dict[str, Any], directory: Path, where: str) -> ShardInfo:
    tar = directory / entry["tar"]
    try:
        size = os.stat(tar).st_size
    except FileNotFoundError:
        raise FileNotFoundError(2, f"No such shard (listed in {where})", str(tar)) from None
    if not tar.is_file():
        raise ValueError(f"{tar}: not a regular file (listed as a shard in {where})")
    index = directory / entry["index"] if entry.get("index") else None
    if index is not None and index.is_file():
        found, source = index_count(str(tar), str(index), entry["count"]), f"its index {index.name}"
    else:
        found, source = count_samples(tar), "the tar itself"
    count = _agreed_count(entry["count"], found, tar=entry["tar"], source=source, where=where)
    return ShardInfo(url=str(tar), index_path=str(index) if index is not None and index.is_file() else None,
                     count=count, bytes=size)


def _remote_entry_shards(manifest: dict[str, Any], base_url: str, where: str) -> list[ShardInfo]:
    base = base_url.rstrip("/")
    entries = manifest["shards"]
    found: list[int | None] = [None] * len(entries)
    indexed = [number for number, entry in enumerate(entries) if entry.get("index")]
    if indexed:
        # One small ranged read per index, issued concurrently by fsspec's async stores.
        fs, _ = filesystem(base_url)
        paths = [filesystem(f"{base}/{entries[n]['index']}")[1] for n in indexed]
        try:
            heads = fs.cat_ranges(paths, [0] * len(paths), [HEAD_BYTES] * len(paths), on_error="return")
        except Exception as error:  # noqa: BLE001 -- any store error: fall back to the manifest's counts
            logger.warning("%s: could not read the shards' indexes (%s); trusting the manifest's counts",
                           where, error)
            heads = [None] * len(paths)
        for number, head in zip(indexed, heads):
            if isinstance(head, (bytes, bytearray)):
                found[number] = parse_count(bytes(head), f"{base}/{entries[number]['index']}")
    return [ShardInfo(url=f"{base}/{entry['tar']}", index_path=None,
                      count=_agreed_count(entry["count"], found[number], tar=entry["tar"],
                                          source=f"its index {entry['index']}", where=where),
                      bytes=entry.get("bytes"))
            for number, entry in enumerate(entries)]


def _shards_from_manifest(manifest: dict[str, Any], directory: str | Path, where: str) -> list[ShardInfo]:
    if isinstance(directory, str) and url_scheme(directory) is not None:
        shards = _remote_entry_shards(manifest, directory, where)
    else:
        shards = [_local_entry_shard(entry, Path(directory), where) for entry in manifest["shards"]]
    _check_distinct(shards, where=where)
    return shards


def _check_distinct(shards: Sequence[ShardInfo], *, where: str) -> None:
    """Refuse a set that lists one tar twice (a local one by its real path): every epoch would
    read its samples twice, silently."""
    seen: dict[str, int] = {}
    for number, shard in enumerate(shards):
        identity = os.path.realpath(shard.url) if shard.is_local else shard.url
        if identity in seen:
            raise ValueError(f"{where} lists the shard {shard.url} twice (shards {seen[identity]} and "
                             f"{number}); a shard set names each tar once")
        seen[identity] = number


def _local_shard(path: Path) -> ShardInfo:
    if not path.exists():
        raise FileNotFoundError(2, "No such shard", str(path))
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file, so not a shard")
    index = path.with_suffix(".idx")
    count = index_count(str(path), str(index)) if index.is_file() else None
    return ShardInfo(url=str(path), index_path=str(index) if index.is_file() else None,
                     count=count, bytes=path.stat().st_size)


# ----------------------------------------------------------------------------- resolving --data
def _remote_shard_set(url: str) -> ShardSet:
    """A URL: a brace pattern or ``.tar`` (counts unknown), a ``manifest.json``, or a folder
    (``s3://bucket/shards/``) whose ``manifest*.json`` are read as for a local folder."""
    import braceexpand

    register_webdataset_handlers()  # any webdataset reader of these URLs streams through fsspec too
    scheme = url_scheme(url)
    if "{" in url or url.endswith(".tar") or scheme in WEBDATASET_SCHEMES and not url.endswith(".json"):
        return ShardSet(shards=tuple(ShardInfo(url=u, index_path=None, count=None)
                                     for u in braceexpand.braceexpand(url)))
    try:
        if url.endswith(".json"):
            manifest = read_manifest(url)
            return ShardSet(shards=tuple(_shards_from_manifest(manifest, url.rsplit("/", 1)[0], url)),
                            manifests=(manifest,))
        fs, path = filesystem(url)
        folder = path.rstrip("/")
        manifest_urls = sorted(fs.unstrip_protocol(p) for p in fs.glob(f"{folder}/manifest*.json"))
        if manifest_urls:
            manifests = [read_manifest(u) for u in manifest_urls]
            shards = [s for u, m in zip(manifest_urls, manifests) for s in _shards_from_manifest(m, url, u)]
            return ShardSet(shards=tuple(shards), manifests=tuple(manifests))
        tars = sorted(fs.unstrip_protocol(p) for p in fs.glob(f"{folder}/*.tar"))
    except (ValueError, FileNotFoundError, ImportError):
        raise
    except Exception as error:  # noqa: BLE001 -- a store's own errors (credentials, network) as one line
        raise store_error(url, error) from error
    if not tars:
        raise ValueError(f"{url}: no manifest.json and no .tar shards at this URL")
    return ShardSet(shards=tuple(ShardInfo(url=u, index_path=None, count=None) for u in tars))


def load_shard_set(source: str | os.PathLike | Sequence[str | os.PathLike]) -> ShardSet:
    """Resolve what a user passed as ``--data``/``--shards`` into a :class:`ShardSet`.

    Args:
        source: a directory written by ``ecomaug shard`` (all ``manifest*.json`` in it are
            merged, so the output of a split ``--num-jobs`` conversion reads as one set); a
            ``manifest.json`` path; a ``.tar`` path or brace pattern
            (``shards/shard-{000000..000009}.tar``); a remote URL (``s3://``, ``gs://``,
            ``https://``, ``pipe:``) of a tar or brace pattern, a remote ``manifest.json`` or
            a remote folder (``s3://bucket/shards/``, read like a local one through fsspec);
            or a list of any of these.

    Returns:
        The shards in a stable order. A manifest's entries must be plain file names inside
        its folder. A manifest's counts are checked against each shard's ``.idx`` (or, with
        no index, the tar's member headers): where they disagree the shard's own count is
        used and a warning names both. Local tars without a manifest take their counts from
        their ``.idx`` file when present; remote tars given directly have ``count=None``.

    Raises:
        FileNotFoundError: a local path, or a shard a manifest lists, does not exist.
        ValueError: a directory holds no manifest and no shards, a manifest is malformed or
            lists an unsafe entry, the set lists one tar twice (its samples would be read twice
            an epoch), or a path is not a regular file (a FIFO, a device).
        ImportError: a URL's fsspec backend (``s3fs``, ``gcsfs``) is not installed.
    """
    shard_set = _resolve(source)
    _check_distinct(shard_set.shards, where=os.fspath(source) if isinstance(source, (str, os.PathLike))
                    else "the shard list")
    return shard_set


# Names of the image files a folder given as shards may hold by mistake (a hint, not a check).
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _holds_images(folder: Path, *, folders: int = 100) -> bool:
    """Whether ``folder`` or a folder below it (the first ``folders`` walked) holds a file named like an image."""
    for _, (_, _, files) in zip(range(folders), os.walk(folder)):
        if any(name.lower().endswith(_IMAGE_SUFFIXES) for name in files):
            return True
    return False

def _resolve(source: str | os.PathLike | Sequence[str | os.PathLike]) -> ShardSet:
    if isinstance(source, (list, tuple)):
        parts = [load_shard_set(item) for item in source]
        if not parts:
            raise ValueError("no shards given (an empty list)")
        return ShardSet(shards=tuple(s for part in parts for s in part.shards),
                        manifests=tuple(m for part in parts for m in part.manifests))
    text = os.fspath(source)
    if url_scheme(text) is not None:
        return _remote_shard_set(text)
    if "{" in text:
        import braceexpand

        return load_shard_set([path for path in braceexpand.braceexpand(text)])
    path = Path(text)
    if path.is_dir():
        manifest_paths = sorted(path.glob("manifest*.json"))
        if manifest_paths:
            manifests = [read_manifest(p) for p in manifest_paths]
            shards = [s for p, m in zip(manifest_paths, manifests) for s in _shards_from_manifest(m, path, str(p))]
            return ShardSet(shards=tuple(shards), manifests=tuple(manifests))
        tars = sorted(path.glob("*.tar"))
        if not tars:
            hint = (f"; it looks like a folder of images: convert it first: ecomaug shard {path} {path}-shards "
                    f"--max-size 320, then pass {path}-shards") if _holds_images(path) else ""
            raise ValueError(f"{path}: no manifest.json and no .tar shards in this directory{hint}")
        return ShardSet(shards=tuple(_local_shard(t) for t in tars))
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    if path.suffix == ".json":
        manifest = read_manifest(path)
        return ShardSet(shards=tuple(_shards_from_manifest(manifest, path.parent, str(path))),
                        manifests=(manifest,))
    return ShardSet(shards=(_local_shard(path),))


def iter_skipped(directory: str | os.PathLike) -> Iterable[dict[str, Any]]:
    """Yield the records of every ``skipped*.jsonl`` in a shard directory."""
    for path in sorted(Path(directory).glob("skipped*.jsonl")):
        with io.TextIOWrapper(open_regular_file(path), encoding="utf-8") as stream:
            for line in stream:
                if line.strip():
                    yield json.loads(line)
