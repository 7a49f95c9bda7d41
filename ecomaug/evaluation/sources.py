"""Where the images to embed come from: shards, a CSV/JSONL manifest or a plain image folder.

Each source yields ``(key, metadata, encoded bytes)`` in a fixed order without decoding. What
cannot be read is recorded in a :class:`ReadReport` (or raises naming the shard or file) instead
of failing with a traceback, and so is every sample a shard's count promises but the shard does
not hold (cut between members, a corrupt member header), as the loaders count it. A listed path
is only opened as a regular file (:func:`loaders.remote.open_regular_file`): a FIFO or a device
is skipped with its reason, never read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from loaders.convert.inputs import list_image_files
from loaders.remote import NOT_REGULAR, NotRegularFileError, open_regular_file

Sample = tuple[str, dict[str, Any], Any]  # key, metadata, image (bytes or PIL) or a callable


@dataclass
class ReadReport:
    """What reading the data skipped, so a bulk job can say so instead of failing or hiding it.

    Attributes:
        skipped: one record per sample or shard that was not (fully) read:
            ``{"where": shard or path, "key": ... or None, "reason": ..., "position": n}``, where
            ``position`` is how many samples the stream had yielded before it. A sample the data
            promises (a shard's count) but does not hold has ``"missing": True`` too; a shard of
            unknown count that breaks is one record with key None.
        duplicate_keys: samples whose key appeared earlier in the same shard; both are kept, the
            later one renamed ``<key>~<n>`` (n = 1, 2, ...), so every key stays unique.
        yielded: samples the stream yielded (read and handed on; a later stage that drops one,
            such as :func:`~ecomaug.evaluation.embed.decodable_samples`, takes it off).
    """

    skipped: list[dict[str, Any]] = field(default_factory=list)
    duplicate_keys: int = 0
    yielded: int = 0

    @property
    def missing(self) -> int:
        """How many promised samples the data did not hold (records with ``"missing"``)."""
        return missing_count(self.skipped)


def missing_count(skipped: Sequence[Mapping[str, Any]]) -> int:
    """How many skip records are samples missing from the data (not read at all)."""
    return sum(1 for record in skipped if record.get("missing"))


def read_counts(done: int, skipped: Sequence[Mapping[str, Any]], promised: int | None
                ) -> dict[str, int | None]:
    """How a read went, in numbers that reconcile: read = embedded + skipped, and (where the
    data's count is known) promised = read + missing.

    Args:
        done: samples used (embedded).
        skipped: every skip record (:attr:`ReadReport.skipped` and the images that did not decode).
        promised: how many samples the data says it holds (None: unknown).

    Returns:
        ``{"promised", "read", "embedded", "skipped", "missing", "broken_shards"}``, the last
        counting shards of unknown count that broke (how many samples they lost is unknown).
    """
    return tally(done, records=len(skipped), missing=missing_count(skipped),
                 broken=sum(1 for record in skipped if record.get("key") is None),
                 repeats=sum(1 for record in skipped if record.get("repeat")), promised=promised)


def tally(done: int, *, records: int, missing: int, broken: int, repeats: int, promised: int | None
          ) -> dict[str, int | None]:
    """:func:`read_counts` from totals (several ranks' done records add up this way).

    Args:
        done: samples embedded.
        records: skip records in all.
        missing: records of samples the data promised but did not hold.
        broken: records of shards of unknown count that broke.
        repeats: records of a key written again right after itself (listed, but one sample
            with its first copy: neither read again nor skipped).
        promised: the data's own count (None: unknown).
    """
    unused = records - missing - broken - repeats
    return {"promised": promised, "read": done + unused, "embedded": done, "skipped": unused,
            "missing": missing, "broken_shards": broken, "repeats": repeats}


def shortfall(counts: Mapping[str, int | None], *, verb: str = "embedded",
              where: str | None = None) -> str:
    """What was not used, as one clause for a command's closing line ("" when nothing was lost).

    E.g. ``"18 of 24 promised samples embedded: 20 read (2 skipped), 4 missing from the data
    (listed in x.skipped.jsonl)"``.

    Args:
        counts: what :func:`read_counts` returns.
        verb: what the ``embedded`` count did.
        where: the file or folder that lists the skip records.
    """
    promised, done, broken = counts.get("promised"), counts["embedded"], counts.get("broken_shards") or 0
    if not counts["skipped"] and not counts["missing"] and not broken and promised in (None, done):
        return ""
    of = f" of {promised} promised" if promised is not None else ""
    shards = f", {broken} shards of unknown count unreadable" if broken else ""
    listed = f" (listed in {where})" if where and (counts["skipped"] or counts["missing"] or broken) else ""
    return (f"{done}{of} samples {verb}: {counts['read']} read ({counts['skipped']} skipped), "
            f"{counts['missing']} missing from the data{shards}{listed}")


def error_reason(error: BaseException) -> str:
    """An error as ``"Type: its first line"`` for a skip record or a one-line message."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {text}"


def iter_shard_samples(shards: Any, *, report: ReadReport | None = None
                       ) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """Yield ``(key, meta, image bytes)`` of every sample in shard order (no decoding).

    The image is the sample's first member of the loaders' image extensions (``.jpg``,
    ``.jpeg``, ``.png``, ``.webp``). Each shard is read to its end and what it held is checked
    against its count (manifest / ``.idx``), as the loaders check it: a shard cut between
    members or with a corrupt member header is short, not silently smaller.

    Args:
        shards: what :func:`loaders.manifest.load_shard_set` reads.
        report: where unreadable shards (zero-byte, truncated, not a tar), samples without an
            image member, each sample a shard's count promises but the shard does not hold
            (``"missing": True``; named from its ``.idx`` where there is one, else
            ``<shard>#<n>``) and duplicate keys are recorded; the samples read before a shard
            broke are kept. Without it, any of these raises ValueError naming the shard and a
            duplicate key warns.

    Raises:
        ValueError: a shard cannot be read, is short, or holds a sample without an image
            (only when ``report`` is None).
    """
    from loaders.manifest import load_shard_set
    from loaders.shard_reader import (REPEATED, SHARD_ERRORS, SampleProblem, first_line, parse_meta,
                                      repeated_reason, shard_samples)
    from loaders.torch_backend import IMAGE_EXTENSIONS

    position = 0
    duplicates = 0
    for shard in load_shard_set(shards).shards:
        seen: dict[str, int] = {}  # key -> how many times it came before
        read, broken, samples = 0, None, shard_samples(shard.url)
        try:
            for sample in samples:
                read += 1
                key, meta_bytes = sample["__key__"], sample.get("json")
                image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
                repeats = seen[key] = seen.get(key, -1) + 1
                if image is None:
                    reason = f"no image member (.{'/.'.join(IMAGE_EXTENSIONS)})"
                    if report is None:
                        raise _NoImage(f"{shard.url}: sample {key} has {reason}")
                    report.skipped.append({"where": shard.url, "key": key, "position": position,
                                           "reason": reason})
                    continue
                if REPEATED in sample:  # the same key right after itself: one sample (as the shard's
                    # count has it), the first copy read; the repeat is listed, not counted as read
                    _skip(report, shard.url, key, position, repeated_reason(sample[REPEATED]), repeat=True)
                try:
                    meta = parse_meta(meta_bytes, key)
                except SampleProblem as problem:
                    _skip(report, shard.url, key, position, str(problem))
                    continue
                if repeats:
                    duplicates += 1
                    meta = {**meta, "duplicate_of": key}
                    key = f"{key}~{repeats}"
                position += 1
                if report is not None:
                    report.yielded += 1
                yield key, meta, image
        except _NoImage as error:
            raise ValueError(str(error)) from None
        except SHARD_ERRORS as error:
            broken = f"{type(error).__name__}: {first_line(error)}"  # as the loaders say it
        finally:
            samples.close()
        _check_shard_end(shard, seen, read, position, broken, report)
    if report is not None:
        report.duplicate_keys += duplicates
    elif duplicates:
        import warnings

        warnings.warn(f"{duplicates} samples repeat a key of their shard; both were kept, the "
                      "later renamed <key>~<n>", stacklevel=2)


def _skip(report: ReadReport | None, where: str, key: str, position: int, reason: str, *,
          repeat: bool = False) -> None:
    """Record a sample left out of a shard, or, with no report to record it, raise (as ValueError
    once out of the shard's read loop, which takes a ValueError for a broken shard)."""
    if report is None:
        raise _NoImage(f"{where}: sample {key}: {reason}")
    report.skipped.append({"where": where, "key": key, "position": position, "reason": reason,
                           **({"repeat": True} if repeat else {})})


class _NoImage(Exception):
    """A sample that cannot be used, with no report to record it (not one of SHARD_ERRORS)."""


def _check_shard_end(shard: Any, seen: dict[str, int], read: int, position: int,
                     broken: str | None, report: ReadReport | None) -> None:
    """Record (or raise on) a shard that broke or held fewer samples than its count promised.

    Args:
        shard: the :class:`loaders.manifest.ShardInfo`.
        seen: the keys the shard held; read: how many samples it held.
        position: samples yielded so far.
        broken: the error that stopped the shard's reading (None: it read to its end).
        report: where the records go (None: raise).
    """
    if broken is None and (shard.count is None or read >= shard.count):
        return
    problem = (f"unreadable after {read} samples ({broken})" if broken is not None else
               f"short: it ends after {read} samples, its count says {shard.count}")
    if report is None:
        raise ValueError(f"{shard.url}: cannot read this shard to its end: it is {problem}")
    if shard.count is None:  # how much is lost is unknown: one record for the shard
        report.skipped.append({"where": shard.url, "key": None, "position": position,
                               "reason": f"unreadable shard, the rest of it skipped ({broken})"})
        return
    for key in _missing_keys(shard, seen, read, shard.count - read):
        report.skipped.append({"where": shard.url, "key": key, "position": position,
                               "missing": True, "reason": f"missing: the shard is {problem}"})


def _missing_keys(shard: Any, seen: dict[str, int], read: int, missing: int) -> list[str]:
    """The keys of a shard's ``missing`` samples: those of its ``.idx`` it did not hold, or, with
    no usable index, ``<shard name>#<position>`` as the loaders name them."""
    if missing <= 0:
        return []
    if shard.index_path is not None:
        from loaders.dali_index import read_samples

        try:
            keys = [sample.key for sample in read_samples(shard.index_path) if sample.key not in seen]
        except (OSError, ValueError, IndexError):
            keys = []
        if len(keys) == missing:
            return keys
    name = shard.url.rstrip("/").rsplit("/", 1)[-1]
    return [f"{name}#{index}" for index in range(read, read + missing)]


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
            if report is not None:
                report.yielded += 1
            yield relative, {"source": relative}, data


def _read_file(path: Path, key: str, position: int, report: ReadReport | None) -> bytes | None:
    """A listed file's bytes, or None with the reason in ``report`` (without one: raise).

    Only a regular file is read: a FIFO would block forever and a device such as /dev/zero never
    ends, so they are refused as ``ecomaug shard`` refuses them (``not a regular file (a FIFO)``).
    """
    try:
        with open_regular_file(path) as stream:
            return stream.read()
    except (OSError, NotRegularFileError) as error:
        if report is None:
            raise
        reason = (f"{NOT_REGULAR} (a {error.kind})" if isinstance(error, NotRegularFileError)
                  else error_reason(error))
        report.skipped.append({"where": str(path), "key": key, "position": position,
                               "reason": reason})
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
            if report is not None:
                report.yielded += 1
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
