"""The DALI index of a shard (``{prefix}-{NNNNNN}.idx``): its one reader and writer.

``fn.readers.webdataset(index_paths=...)`` reads one index per tar, the format DALI's
``wds2idx`` writes (version 1.2): a first line ``v1.2 <samples>``, then one line per sample,
in tar order, listing each member as ``<ext> <data offset> <size> <member name>``::

    v1.2 2
    jpg 512 10320 0a1b.jpg json 11264 212 0a1b.json
    jpg 12288 9811 77fe.jpg json 22528 198 77fe.json

The conversion writes it, the manifest reads its count, the shard check reads its samples, and
the DALI backend writes a filtered copy without the corrupt ones: all through this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

VERSION = "v1.2"
HEAD_BYTES = 64  # the first line ("v1.2 <count>") fits in this


@dataclass(frozen=True)
class Member:
    """One tar member of a sample: its extension, where its data starts, its size, its name."""

    ext: str
    offset: int
    size: int
    name: str

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class IndexSample:
    """One sample line of an index: the line itself, the sample key and its members by extension."""

    line: str
    key: str
    members: dict[str, Member]

    def member(self, *extensions: str) -> Member | None:
        """The first member with one of ``extensions`` (``"jpg", "jpeg"``), or None."""
        return next((self.members[ext] for ext in extensions if ext in self.members), None)

    @property
    def end(self) -> int:
        """The byte just past this sample's last member data (0 for a line with no member)."""
        return max((member.end for member in self.members.values()), default=0)


def sample_line(members: Sequence[Member]) -> str:
    """The index line of one sample, members in tar order."""
    return " ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in members)


def index_text(lines: Sequence[str]) -> str:
    """The whole index of a shard holding these sample lines: byte for byte what ``wds2idx`` writes."""
    return "".join([f"{VERSION} {len(lines)}\n", *(line + "\n" for line in lines)])


def write_index(path: str | os.PathLike, lines: Sequence[str], *, fsync: bool = False) -> Path:
    """Write an index of ``lines`` to ``path`` (UTF-8; ASCII for ecomaug's keys); ``fsync`` if asked."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(index_text(lines))
        if fsync:
            stream.flush()
            os.fsync(stream.fileno())
    return path


def parse_count(head: bytes, where: str) -> int:
    """The sample count on an index's first line (``v1.2 <count>``, or a bare count in old versions).

    Raises:
        ValueError: naming ``where``: empty, or not a DALI index.
    """
    first = head.split(b"\n", 1)[0].decode("ascii", "replace").split()
    if not first:
        raise ValueError(f"{where}: empty DALI index file")
    try:
        return int(first[-1]) if first[0].startswith("v") else int(first[0])
    except ValueError:
        raise ValueError(f"{where}: not a DALI index (its first line is {' '.join(first)[:40]!r})") from None


def parse_line(line: str) -> IndexSample | None:
    """One sample line -> :class:`IndexSample` (None for a blank line).

    The key is webdataset's: the member name without folders, up to its first dot.
    """
    fields = line.split()
    if not fields:
        return None
    members = {fields[i]: Member(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
               for i in range(0, len(fields) - 3, 4)}
    first = next(iter(members.values()), None)
    key = first.name.rsplit("/", 1)[-1].split(".", 1)[0] if first is not None else "?"
    return IndexSample(line=line, key=key, members=members)


def read_samples(path: str | os.PathLike) -> list[IndexSample]:
    """Every sample of a local index file, in tar order."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()[1:]
    return [sample for sample in map(parse_line, lines) if sample is not None]


def split_inside(samples: Iterable[IndexSample], tar_size: int) -> tuple[list[IndexSample], list[IndexSample]]:
    """The samples whose members all lie inside a tar of ``tar_size`` bytes, and the rest
    (DALI would read past the end of a truncated shard)."""
    inside, beyond = [], []
    for sample in samples:
        (inside if sample.end <= tar_size else beyond).append(sample)
    return inside, beyond
