"""The output folder of a conversion: file names per job, the lock, the checks, a full disk."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from loaders import atomic
from loaders.manifest import read_manifest


class OutDirLocked(FileExistsError):
    """Another run of the same conversion job holds OUT_DIR's lock (``OUT_DIR/.lock``)."""


class DiskFullError(atomic.DiskFullError):
    """The disk holding OUT_DIR filled up; this job's temporary files were removed and the
    journal kept, so the same command resumes once there is space."""

    def __init__(self, code: int, message: str, filename: str) -> None:
        OSError.__init__(self, code, message, filename)  # noqa: PLE1003 -- the message says how to resume

    def __str__(self) -> str:
        return self.strerror or "No space left on device"


@dataclass
class JobNames:
    prefix: str
    manifest: Path
    skipped: Path
    journal: Path
    lock: Path
    shard_pattern: re.Pattern


def job_names(out_dir: Path, prefix: str, num_jobs: int, job_index: int) -> JobNames:
    if num_jobs > 1:
        job_prefix, suffix = f"{prefix}-j{job_index:03d}", f"-j{job_index:03d}"
    else:
        job_prefix, suffix = prefix, ""
    return JobNames(prefix=job_prefix, manifest=out_dir / f"manifest{suffix}.json",
                  skipped=out_dir / f"skipped{suffix}.jsonl",
                  journal=out_dir / f".convert-journal{suffix}.jsonl", lock=out_dir / f".lock{suffix}",
                  shard_pattern=re.compile(rf"^\.?{re.escape(job_prefix)}-\d{{6}}\.(tar|idx)(\..*\.tmp)?$"))



def check_out_dir(out_dir: Path, input_path: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(20, "OUT_DIR is not a directory", str(out_dir))
    if input_path.is_dir():
        try:
            out_dir.resolve().relative_to(input_path.resolve())
        except ValueError:
            return
        raise ValueError(f"OUT_DIR {out_dir} is inside the INPUT folder {input_path}; "
                         f"its shards would become inputs of the next run")


def check_siblings(out_dir: Path, names: JobNames, fingerprint: dict[str, Any],
                   manifests: Sequence[str] | None = None) -> None:
    """Refuse an output folder that holds another conversion (other input, options or split);
    ``manifests``: the other jobs' manifests where they are not in ``out_dir`` (URLs on a store)."""
    mine = {key: value for key, value in fingerprint.items() if key != "job_index"}
    for path in sorted(out_dir.glob("manifest*.json")) if manifests is None else manifests:
        if path == names.manifest:
            continue
        try:
            other = read_manifest(path)
        except ValueError as error:
            raise ValueError(f"OUT_DIR holds a manifest that is not from this conversion ({error}); "
                             f"use an empty directory") from error
        theirs = dict(other.get("options", {}))
        theirs.update(input=other.get("input"), num_jobs=other.get("job", {}).get("count"))
        raise_if_different(mine, {key: theirs.get(key) for key in mine}, path)


def raise_if_different(expected: dict[str, Any], found: dict[str, Any], where: Path | str) -> None:
    differences = [f"{key} {found.get(key)!r} != {value!r}" for key, value in expected.items()
                   if found.get(key) != value]
    if differences:
        raise ValueError(f"{where} belongs to a conversion with other input or options "
                         f"({'; '.join(differences[:3])}); use an empty OUT_DIR or the same options")


@contextlib.contextmanager
def out_dir_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (``OUT_DIR/.lock``, ``.lock-jNNN`` for a
    split job) while one run converts; a second run of the same job fails at once naming the
    holder (pid, host, start time, which the file holds). The file is removed on release; a
    run that locked a file a releasing holder had just removed locks the new one instead.

    Raises:
        OutDirLocked: another run holds the lock.
    """
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(descriptor, 4096, 0).decode("utf-8", "replace").strip()
            os.close(descriptor)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            try:
                held = json.loads(holder)
                who = f"pid {held['pid']} on host {held['host']} since {held['started']}"
            except (ValueError, KeyError, TypeError):
                who = "a run that is still starting"
            raise OutDirLocked(errno.EEXIST, f"OUT_DIR is being written by another `ecomaug shard` "
                                             f"({who}); wait for it or use another OUT_DIR; lock",
                               str(path)) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:
            break
        os.close(descriptor)  # the holder removed this file as we opened it: lock the new one
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        try:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, json.dumps(holder).encode("utf-8") + b"\n", 0)
        except OSError:  # a full disk: the lock holds without the note
            pass
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)


def remove_temporaries(out_dir: Path, names: JobNames) -> list[str]:
    """Remove this job's temporary files (shards, indexes, skipped.jsonl, manifest being
    written); only this job's lock holder writes them. Returns their names."""
    removed = []
    for path in out_dir.iterdir():
        name = path.name
        if name.endswith(".tmp") and (names.shard_pattern.match(name)
                                      or name.startswith((f".{names.skipped.name}", f".{names.manifest.name}."))):
            path.unlink(missing_ok=True)
            removed.append(name)
    return removed


def disk_full(error: OSError, out_dir: Path, names: JobNames) -> DiskFullError:
    remove_temporaries(out_dir, names)
    try:
        free = f"{shutil.disk_usage(out_dir).free / 1e6:.1f} MB free there now"
    except OSError:
        free = "free space unknown"
    where = f" ({error.filename})" if error.filename else ""
    return DiskFullError(error.errno, f"the disk is full: no space left on the device holding OUT_DIR "
                                      f"{out_dir}{where}, {free}; temporary files removed. Free space or "
                                      f"pick another OUT_DIR, then run the same command again to resume",
                         str(out_dir))
