"""Where the images to embed come from: shards, a CSV/JSONL manifest or a plain image folder.

Each source yields ``(key, metadata, encoded bytes)`` in a fixed order without decoding. What
cannot be read is recorded in a :class:`ReadReport` (or raises naming the shard or file) instead
of failing with a traceback.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from loaders.convert.inputs import list_image_files

Sample = tuple[str, dict[str, Any], Any]  # key, metadata, image (bytes or PIL) or a callable


@dataclass
class ReadReport:
    """What reading the data skipped, so a bulk job can say so instead of failing or hiding it.

    Attributes:
        skipped: one record per sample or shard that was not (fully) read:
            ``{"where": shard or path, "key": ... or None, "reason": ..., "position": n}``, where
            ``position`` is how many samples the stream had yielded before it.
        duplicate_keys: samples whose key appeared earlier in the same shard; both are kept, the
            later one renamed ``<key>~<n>`` (n = 1, 2, ...), so every key stays unique.
    """

    skipped: list[dict[str, Any]] = field(default_factory=list)
    duplicate_keys: int = 0


def error_reason(error: BaseException) -> str:
    """An error as ``"Type: its first line"`` for a skip record or a one-line message."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {text}"


def iter_shard_samples(shards: Any, *, report: ReadReport | None = None
                       ) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """Yield ``(key, meta, jpeg bytes)`` of every sample in shard order (no decoding).

    Args:
        shards: what :func:`loaders.manifest.load_shard_set` reads.
        report: where unreadable shards (zero-byte, truncated, not a tar), samples without a
            ``.jpg`` and duplicate keys are recorded; the samples read before a shard broke are
            kept. Without it, an unreadable shard raises ValueError naming it and a duplicate
            key warns.

    Raises:
        ValueError: a shard cannot be read (only when ``report`` is None).
    """
    from loaders.manifest import load_shard_set
    from loaders.shard_reader import SHARD_ERRORS, shard_samples

    position = 0
    duplicates = 0
    for shard in load_shard_set(shards).shards:
        seen: dict[str, int] = {}
        try:
            for sample in shard_samples(shard.url):
                key, meta_bytes, jpeg = sample["__key__"], sample.get("json"), sample.get("jpg")
                if jpeg is None:
                    if report is not None:
                        report.skipped.append({"where": shard.url, "key": key, "position": position,
                                               "reason": "no .jpg member"})
                    continue
                meta = json.loads(meta_bytes) if meta_bytes else {"key": key}
                if key in seen:
                    seen[key] += 1
                    duplicates += 1
                    meta = {**meta, "duplicate_of": key}
                    key = f"{key}~{seen[key]}"
                else:
                    seen[key] = 0
                position += 1
                yield key, meta, jpeg
        except SHARD_ERRORS as error:
            if report is None:
                raise ValueError(f"{shard.url}: cannot read this shard ({error_reason(error)}); "
                                 f"{position} samples were read before it") from error
            report.skipped.append({"where": shard.url, "key": None, "position": position,
                                   "reason": f"unreadable shard, the rest of it skipped "
                                             f"({error_reason(error)})"})
    if report is not None:
        report.duplicate_keys += duplicates
    elif duplicates:
        import warnings

        warnings.warn(f"{duplicates} samples repeat a key of their shard; both were kept, the "
                      "later renamed <key>~<n>", stacklevel=2)


def iter_folder_samples(folder: str | os.PathLike, *, report: ReadReport | None = None
                        ) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """Yield ``(relative path, {"source": ...}, bytes)`` for every image under ``folder``."""
    folder = Path(folder)
    paths = list_image_files(folder)  # chosen by content, hidden files left out, as ecomaug shard does
    if not paths:
        raise ValueError(f"{folder}: no images in this folder (files are recognised by content)")
    position = 0
    for path in paths:
        relative = path.relative_to(folder).as_posix()
        data = _read_file(path, relative, position, report)
        if data is not None:
            position += 1
            yield relative, {"source": relative}, data


def _read_file(path: Path, key: str, position: int, report: ReadReport | None) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as error:
        if report is None:
            raise
        report.skipped.append({"where": str(path), "key": key, "position": position,
                               "reason": error_reason(error)})
        return None


def iter_manifest_samples(manifest: str | os.PathLike, *, report: ReadReport | None = None
                          ) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """Yield the images a CSV / JSONL manifest lists (as ``ecomaug shard`` reads it) with its columns.

    The key is the path as written in the manifest; ``source`` holds it too. Relative paths are
    relative to the manifest.
    """
    from loaders.convert.inputs import read_inputs

    position = 0
    for item in read_inputs(manifest).items:
        data = _read_file(Path(item.path), item.identity, position, report)
        if data is not None:
            position += 1
            yield item.identity, {"source": item.identity, **item.meta}, data


def data_kind(data: str | os.PathLike) -> str:
    """``"manifest"`` (.csv / .jsonl), ``"folder"`` (images, no shards) or ``"shards"``."""
    path = Path(data)
    if path.suffix.lower() in (".csv", ".jsonl", ".ndjson"):
        return "manifest"
    if path.is_dir() and not any(path.glob("manifest*.json")) and not any(path.glob("*.tar")):
        return "folder"
    return "shards"


def count_samples(data: str | os.PathLike) -> int | None:
    """How many images ``data`` holds, where known without reading them."""
    kind = data_kind(data)
    if kind == "folder":
        return len(list_image_files(data))
    if kind == "manifest":
        from loaders.convert.inputs import read_inputs

        return len(read_inputs(data).items)
    from loaders.manifest import load_shard_set

    return load_shard_set(data).num_samples


def iter_data(data: str | os.PathLike, *, report: ReadReport | None = None
              ) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """Samples of shards (dir, manifest, tar, pattern, URL), a CSV/JSONL manifest or an image folder.

    Args:
        data: what to read.
        report: record what could not be read and go on (see :class:`ReadReport`); without it
            an unreadable shard or file raises.
    """
    kind = data_kind(data)
    if kind == "manifest":
        return iter_manifest_samples(data, report=report)
    if kind == "folder":
        return iter_folder_samples(data, report=report)
    path = Path(data)
    if path.is_file() and path.suffix != ".tar" and path.name != "manifest.json" and \
            not path.name.startswith("manifest"):
        raise ValueError(f"{path}: not shards (.tar, manifest.json or a shard folder), a .csv / "
                         ".jsonl manifest, nor a folder of images")
    return iter_shard_samples(os.fspath(data), report=report)


def data_location(data: str | os.PathLike) -> str:
    """``data`` as recorded in embeddings: absolute for a local path, as given for a URL."""
    text = os.fspath(data)
    return text if "://" in text or text.startswith("pipe:") else os.path.abspath(text)


def is_shards(data: str | os.PathLike) -> bool:
    """Whether ``data`` is read as shards (not a CSV/JSONL manifest, nor an image folder)."""
    return data_kind(data) == "shards"
