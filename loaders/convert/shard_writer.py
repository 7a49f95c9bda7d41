"""One shard on disk: ``{prefix}-{NNNNNN}.tar`` written under a temporary name, its DALI index, a rename.

The tar is byte for byte what webdataset's ``TarWriter(encoder=False, mtime=0)`` writes (a test
checks it), written with :mod:`tarfile` directly: importing webdataset imports torch, seconds of
start-up the conversion's parent process has no use for. The index goes through
:mod:`loaders.dali_index`.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

from loaders.dali_index import Member, sample_line, write_index

TAR_BLOCK = 512


class ShardWriter:
    """Writes one shard under a temporary name, builds its DALI index, renames when closed."""

    def __init__(self, out_dir: Path, name: str):
        self.out_dir = out_dir
        self.tar_name = f"{name}.tar"
        self.index_name = f"{name}.idx"
        self.temporary = out_dir / f".{self.tar_name}.{os.getpid()}.tmp"
        self.stream = open(self.temporary, "wb")
        # tarfile as webdataset's TarWriter(encoder=False, mtime=0) drives it, without importing
        # webdataset, which imports torch (seconds of start-up this process has no use for); a
        # fixed mtime makes reruns byte-identical.
        self.writer = tarfile.open(fileobj=self.stream, mode="w|", format=tarfile.USTAR_FORMAT)
        self.index_lines: list[str] = []
        self.count = 0
        self.groups: dict[str, dict[str, int]] = {}

    @property
    def bytes(self) -> int:
        return self.writer.offset

    def write(self, key: str, jpeg: bytes, meta_json: bytes) -> None:
        start = self.writer.offset
        for extension, data in (("jpg", jpeg), ("json", meta_json)):
            member = tarfile.TarInfo(f"{key}.{extension}")
            member.size, member.mtime, member.mode = len(data), 0, 0o444
            member.uname = member.gname = "bigdata"
            self.writer.addfile(member, io.BytesIO(data))
        # Members in sorted order (jpg, json), as TarWriter writes them, each a 512-byte ustar header and
        # its data padded to 512 bytes; DALI's index lists the data offsets.
        jpg_data = start + TAR_BLOCK
        json_data = jpg_data + padded(len(jpeg)) + TAR_BLOCK
        if self.writer.offset != json_data + padded(len(meta_json)):
            raise RuntimeError("unexpected tar layout from tarfile; cannot index the shard")
        self.index_lines.append(sample_line([Member("jpg", jpg_data, len(jpeg), f"{key}.jpg"),
                                             Member("json", json_data, len(meta_json), f"{key}.json")]))
        self.count += 1

    def count_group(self, column: str, value: Any) -> None:
        per_value = self.groups.setdefault(column, {})
        per_value[str(value)] = per_value.get(str(value), 0) + 1

    def finish(self) -> dict[str, Any]:
        """Close, index and rename; returns the shard's manifest entry."""
        self.writer.close()
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        size = self.temporary.stat().st_size
        index_temporary = self.out_dir / f".{self.index_name}.{os.getpid()}.tmp"
        write_index(index_temporary, self.index_lines, fsync=True)  # what DALI's wds2idx writes
        os.replace(index_temporary, self.out_dir / self.index_name)
        os.replace(self.temporary, self.out_dir / self.tar_name)
        fsync_directory(self.out_dir)
        return {"tar": self.tar_name, "index": self.index_name, "count": self.count,
                "bytes": size, "groups": self.groups}

    def abandon(self) -> None:
        for close in (self.writer.close, self.stream.close):
            try:  # the file goes anyway; closing flushes, which fails again on a full disk
                close()
            except Exception:  # noqa: BLE001
                pass
        self.temporary.unlink(missing_ok=True)


def padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def final_tar_size(offset: int) -> int:
    # tarfile ends an archive with two zero blocks and pads it to a whole 10 KiB record.
    return -(-(offset + 2 * TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE



def fsync_directory(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
