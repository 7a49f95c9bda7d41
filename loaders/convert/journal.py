"""The conversion's journal: one JSON line per settled batch of inputs, so a crash resumes exactly.

A job appends a line each time a shard is renamed into place (how many inputs of its
deterministic order are settled, the shard's manifest entry, what was skipped, the digests that
find duplicates). A torn last line is dropped on reading; the journal is removed once the
manifest is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

JOURNAL_NAME = "ecomaug-convert-journal"


def read_journal(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int]:
    """Header, complete entries and the byte length of the complete part (a torn last line is dropped)."""
    if not path.exists():
        return None, [], 0
    header, entries, good = None, [], 0
    with open(path, "rb") as stream:
        for raw in stream:
            if not raw.endswith(b"\n"):
                break
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                break
            if header is None:
                header = record
            else:
                entries.append(record)
            good += len(raw)
    return header, entries, good


# A file name that is not UTF-8 reaches us surrogate-escaped (os.fsdecode); "backslashreplace"
# writes each such surrogate as the JSON escape \udcXX, so every JSON we write stays valid UTF-8
# and json.loads + os.fsencode give back the name's exact bytes.
NAME_ERRORS = "backslashreplace"


def append_journal(stream, record: dict[str, Any]) -> None:
    stream.write((json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8", NAME_ERRORS))
    stream.flush()
    os.fsync(stream.fileno())



def iter_entries(journal_path: Path) -> Iterator[dict[str, Any]]:
    with open(journal_path, "rb") as stream:
        next(stream)  # header
        for raw in stream:
            yield json.loads(raw)



@dataclass
class JournalState:
    """What earlier journal entries settled: inputs consumed, shards, duplicate digests."""

    consumed: int = 0
    next_shard: int = 0
    by_bytes: dict[str, str] = field(default_factory=dict)
    by_pixels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_entries(cls, entries: list[dict[str, Any]]) -> "JournalState":
        state = cls()
        for entry in entries:
            state.consumed = entry["consumed"]
            if entry.get("shard"):
                state.next_shard += 1
            for key, bytes_digest, pixel_digest in entry.get("samples", ()):
                state.by_bytes.setdefault(bytes_digest, key)
                state.by_pixels.setdefault(pixel_digest, key)
        return state
