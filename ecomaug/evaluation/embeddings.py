"""Embeddings on disk: one ``.npz`` set, or a folder of parts written rank by rank and resumable.

An :class:`Embeddings` holds the vectors, their keys and each sample's metadata and is saved as
one ``.npz`` (no pickle). :func:`ecomaug.evaluation.embed.embed_to_parts` streams into a parts
folder instead: each rank writes ``part-r<rank>-<n>.npz`` files through a :class:`RankParts`
(which resumes from the parts an earlier run finished), then ``done-r<rank>-of-<W>.json``;
:func:`load_embeddings` reads a finished folder as one set.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecomaug.evaluation.sources import error_reason, read_counts, tally
from loaders.atomic import write_atomic, write_json_atomic
from loaders.remote import open_regular_file


@dataclass
class Embeddings:
    """Embeddings with the key and metadata of every row.

    Shape:
        - vectors: :math:`(N, D)` float32 (not normalised; retrieval normalises).
    """

    vectors: torch.Tensor
    keys: list[str]
    meta: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    def column(self, name: str) -> list[Any]:
        """One metadata column (e.g. ``item_id``), None where a row lacks it."""
        return [row.get(name) for row in self.meta]

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``.npz`` with ``vectors``, ``keys``, ``meta`` (JSON per row), ``info`` (JSON)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"embeddings are saved as .npz; got {path.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()  # np.savez wants a seekable file; the atomic writer streams
        np.savez(buffer, vectors=self.vectors.float().cpu().numpy(), keys=np.array(self.keys, dtype=str),
                 meta=np.array([json.dumps(row, sort_keys=True) for row in self.meta], dtype=str),
                 info=np.array(json.dumps(self.info, sort_keys=True)))
        write_atomic(path, lambda stream: stream.write(buffer.getbuffer()))
        return path


def load_embeddings(path: str | os.PathLike) -> Embeddings:
    """Read a file written by :meth:`Embeddings.save`, or a finished parts folder.

    A folder (of :func:`~ecomaug.evaluation.embed.embed_to_parts`) is read as one set: every
    rank's parts in rank and part order, which is the data's order. It must be complete (every rank
    finished); no pickle is involved.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not an embeddings file, or an unfinished parts folder.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "No such embeddings file or folder", str(path))
    if path.is_dir():
        return _checked(_load_parts(path), path)
    try:
        with open_regular_file(path) as stream, np.load(stream, allow_pickle=False) as data:
            embeddings = Embeddings(vectors=torch.from_numpy(data["vectors"]),
                                    keys=data["keys"].tolist(),
                                    meta=[json.loads(row) for row in data["meta"].tolist()],
                                    info=json.loads(str(data["info"])))
    except (OSError, KeyError, ValueError, EOFError) as error:
        raise ValueError(f"{path}: not an embeddings file written by ecomaug embed "
                         f"({error_reason(error)})") from error
    return _checked(embeddings, path)


def _checked(embeddings: Embeddings, path: Path) -> Embeddings:
    """``embeddings`` if its vectors are an (N, D) float matrix of finite values, one row per key."""
    vectors = embeddings.vectors
    if vectors.ndim != 2 or not vectors.is_floating_point() or \
            not vectors.shape[0] == len(embeddings.keys) == len(embeddings.meta):
        raise ValueError(f"{path}: vectors must be an N x D float matrix with one key and meta row each; "
                         f"got {vectors.dtype} {tuple(vectors.shape)}, {len(embeddings.keys)} keys")
    finite = torch.isfinite(vectors).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"{path}: {int((~finite).sum())} of {len(finite)} vectors hold NaN/inf values "
                         f"(e.g. key {embeddings.keys[int((~finite).nonzero()[0])]!r}): embedded with broken "
                         "weights? refused")
    return embeddings


PART_PATTERN = "part-r{rank:05d}-{part:06d}.npz"
DONE_PATTERN = "done-r{rank:05d}-of-{world_size:05d}.json"


def is_parts_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`~ecomaug.evaluation.embed.embed_to_parts`."""
    path = Path(path)
    return path.is_dir() and (any(path.glob("done-r*-of-*.json")) or any(path.glob("part-r*.npz")))


def _load_parts(folder: Path) -> Embeddings:
    done = sorted(folder.glob("done-r*-of-*.json"))
    if not done:
        if any(folder.glob("part-r*.npz")):
            raise ValueError(f"{folder}: the embedding was not finished (no rank is done); rerun "
                             "the same ecomaug embed command to complete it")
        raise ValueError(f"{folder}: not an embeddings folder (no part-r*.npz / done-r*.json)")
    records = [json.loads(p.read_text(encoding="utf-8")) for p in done]
    world_sizes = {record["world_size"] for record in records}
    if len(world_sizes) != 1:
        raise ValueError(f"{folder}: parts of runs with different world sizes {sorted(world_sizes)}")
    world_size = world_sizes.pop()
    finished = {record["rank"] for record in records}
    missing = sorted(set(range(world_size)) - finished)
    if missing:
        raise ValueError(f"{folder}: ranks {missing} of {world_size} have not finished; rerun them "
                         "with the same ecomaug embed command")
    vectors: list[torch.Tensor] = []
    keys: list[str] = []
    meta: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    for record in sorted(records, key=lambda r: r["rank"]):
        for part in range(record["parts"]):
            piece = load_embeddings(folder / PART_PATTERN.format(rank=record["rank"], part=part))
            if not piece.keys:
                continue  # every sample of this part was skipped
            vectors.append(piece.vectors)
            keys.extend(piece.keys)
            meta.extend(piece.meta)
            info = info or {k: v for k, v in piece.info.items() if k not in _PART_FIELDS}
    if not vectors:
        raise ValueError(f"{folder}: the embedding holds no vectors (every sample was skipped)")
    rows = sum(record["rows"] for record in records)
    if rows != len(keys):
        raise ValueError(f"{folder}: the done records count {rows} rows, the parts hold {len(keys)}")
    read = tally(rows, records=sum(record["skipped"] for record in records),
                 missing=sum(record.get("missing", 0) for record in records),
                 broken=sum(record.get("broken_shards", 0) for record in records),
                 repeats=sum(record.get("repeats", 0) for record in records), promised=info.get("stream_total"))
    return Embeddings(vectors=torch.cat(vectors), keys=keys, meta=meta,
                      info={**info, "parts": sum(r["parts"] for r in records),
                            "world_size": world_size, "read": read})


_PART_FIELDS = ("part", "rank", "stream_start", "stream_stop", "skipped")


@dataclass
class PartsReport:
    """What one rank of :func:`embed_to_parts` wrote.

    Attributes:
        folder: the parts folder.
        rank: this process's rank; world_size: how many ranks share the data.
        rows: vectors this rank holds in its parts (all runs together).
        parts: its part files; resumed_parts: how many of them an earlier run had written.
        seen: samples of this rank's share that were read (rows + skipped samples).
        skipped: records of what was not embedded (``skipped-r<rank>.jsonl`` holds them),
            the samples missing from the data (``"missing": True``) among them.
        duplicate_keys: rows whose key repeated an earlier one of the same shard (kept, renamed).
        dim: the vectors' width.
        promised: how many samples the data says it holds (one rank only; None: unknown).
    """

    folder: Path
    rank: int
    world_size: int
    rows: int
    parts: int
    resumed_parts: int
    seen: int
    skipped: list[dict[str, Any]]
    duplicate_keys: int
    dim: int
    promised: int | None = None

    @property
    def counts(self) -> dict[str, int | None]:
        """:func:`~ecomaug.evaluation.sources.read_counts` of this rank (read = rows + skipped)."""
        return read_counts(self.rows, self.skipped, self.promised)

    @property
    def skipped_file(self) -> Path:
        """The file listing this rank's skip records."""
        return self.folder / f"skipped-r{self.rank:05d}.jsonl"


def write_skipped(path: str | os.PathLike, skipped: list[dict[str, Any]]) -> Path:
    """Write skip records to ``path``, one JSON object a line (atomically; empty when none)."""
    text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in skipped)
    return write_atomic(Path(path), lambda stream: stream.write(text.encode("utf-8")))


def _part_info(path: Path) -> dict[str, Any]:
    with open_regular_file(path) as stream, np.load(stream, allow_pickle=False) as data:
        return json.loads(str(data["info"]))


class RankParts:
    """One rank's parts in a parts folder: the checks, what an earlier run finished, the writes.

    Opening it creates the folder, refuses one that holds another split (or another model, data or
    part size: ``settings`` must equal every finished part's), drops temporary files a kill left
    and counts the finished parts, which a resumed run keeps.

    Args:
        folder: the parts folder.
        rank: this process's rank; world_size: how many ranks share the data.
        settings: what every part of the folder must have been made with (model, data, split).

    Raises:
        NotADirectoryError: ``folder`` is a file.
        ValueError: the folder holds parts of another split or other settings.
    """

    def __init__(self, folder: str | os.PathLike, *, rank: int, world_size: int,
                 settings: dict[str, Any]) -> None:
        self.folder, self.rank, self.world_size, self.settings = Path(folder), rank, world_size, settings
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(20, "--out for parts must be a folder", str(self.folder))
        self.folder.mkdir(parents=True, exist_ok=True)
        for other in self.folder.glob("done-r*-of-*.json"):
            if not other.name.endswith(f"-of-{world_size:05d}.json"):
                raise ValueError(f"{self.folder}: holds parts of a run split "
                                 f"{int(other.stem.split('-of-')[1])} ways, not {world_size}; use "
                                 "another --out")
        for stale in self.folder.glob(f".part-r{rank:05d}-*.tmp.npz"):
            stale.unlink()  # left by a kill in the middle of a write
        self.parts, self.rows, self.duplicates = 0, 0, 0
        self.earlier_skipped: list[dict[str, Any]] = []
        while self.path(self.parts).is_file():
            info = _part_info(self.path(self.parts))
            different = [k for k in settings if info.get(k) != settings[k]]
            if different:
                raise ValueError(f"{self.folder}: its parts were made with another {different[0]} "
                                 f"({info.get(different[0])!r}, now {settings[different[0]]!r}); "
                                 "use another --out or remove it")
            self.rows += info["rows"]
            self.duplicates += info["duplicates"]
            self.earlier_skipped.extend(info["skipped"])
            self.parts += 1
        self.resumed = self.parts

    def path(self, part: int) -> Path:
        """The file of this rank's part number ``part``."""
        return self.folder / PART_PATTERN.format(rank=self.rank, part=part)

    def write(self, first: int, last: int, vectors: torch.Tensor, keys: list[str],
              meta: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> None:
        """Write the next part: samples ``first .. last`` of the stream (atomically).

        Shape:
            - vectors: :math:`(R, D)`, one row per key (``R`` may be 0: all skipped).
        """
        duplicates = sum(1 for row in meta if "duplicate_of" in row)
        info = {**self.settings, "rank": self.rank, "part": self.parts, "stream_start": first,
                "stream_stop": last, "rows": len(keys), "duplicates": duplicates,
                "skipped": skipped}
        Embeddings(vectors=vectors, keys=keys, meta=meta, info=info).save(self.path(self.parts))
        self.parts += 1
        self.rows += len(keys)
        self.duplicates += duplicates

    def skipped_in_parts(self) -> list[dict[str, Any]]:
        """What the parts record as skipped: the earlier run's, then this run's, in part order."""
        return self.earlier_skipped + [record for part in range(self.resumed, self.parts)
                                       for record in _part_info(self.path(part))["skipped"]]

    def finish(self, *, seen: int, skipped: list[dict[str, Any]], dim: int,
               promised: int | None = None) -> PartsReport:
        """Write ``skipped-r<rank>.jsonl`` and the done record; the rank's :class:`PartsReport`.

        Args:
            seen: samples of this rank's share that were read.
            skipped: every record of what was not embedded (missing samples included).
            dim: the vectors' width (0: read it from the parts).
            promised: how many samples the data says it holds (one rank only).
        """
        if not dim and self.rows:
            dim = _part_dim(self.folder, self.rank, self.parts)
        write_skipped(self.folder / f"skipped-r{self.rank:05d}.jsonl", skipped)
        counts = read_counts(self.rows, skipped, promised)
        write_json_atomic(self.folder / DONE_PATTERN.format(rank=self.rank, world_size=self.world_size),
                          {"rank": self.rank, "world_size": self.world_size, "rows": self.rows,
                           "parts": self.parts, "seen": seen, "skipped": len(skipped),
                           "missing": counts["missing"], "broken_shards": counts["broken_shards"],
                           "repeats": counts["repeats"],
                           "duplicate_keys": self.duplicates, "dim": dim,
                           **{k: self.settings[k] for k in ("model", "source", "data")}})
        return PartsReport(folder=self.folder, rank=self.rank, world_size=self.world_size,
                           rows=self.rows, parts=self.parts, resumed_parts=self.resumed, seen=seen,
                           skipped=skipped, duplicate_keys=self.duplicates, dim=dim,
                           promised=promised)


def _part_dim(folder: Path, rank: int, parts: int) -> int:
    """The vectors' width in a rank's parts (a resumed run may compute none itself)."""
    for part in range(parts):
        with open_regular_file(folder / PART_PATTERN.format(rank=rank, part=part)) as stream, \
                np.load(stream, allow_pickle=False) as data:
            if data["vectors"].shape[0]:
                return int(data["vectors"].shape[1])
    return 0
