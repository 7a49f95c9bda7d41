"""Images -> WebDataset shards: streaming, parallel, resumable and crash-safe.

:func:`convert_to_shards` lists the inputs (a folder or a CSV/JSONL manifest), optionally
samples them evenly per group and keeps this job's share, cleans every image in worker
processes (:mod:`loaders.images`) and writes ``{prefix}-{NNNNNN}.tar`` shards (byte for byte what
webdataset's ``TarWriter`` writes) plus a DALI index per shard, then ``manifest.json`` and
``skipped.jsonl`` (format: ``docs/architecture.md``, "Shard format").

Crash safety: a shard is written under a hidden temporary name and renamed when complete; then
one line is appended to a per-job journal (``.convert-journal*.jsonl``) saying how many inputs
(a prefix of this job's deterministic input order) are settled, which shard they went to, what
was skipped and the digests used to find duplicates. Running the same command again after a
crash deletes any shard the journal does not know, and continues after the last settled input,
so every input ends up exactly once, written or skipped. The journal is removed once the
manifest is written.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import errno
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from loaders.images import HygieneOptions, ImageHook, Prepared, Rejected, prepare_image, use_one_torch_thread
from loaders.inputs import NOT_REGULAR, InputItem, InputListing, read_inputs
from loaders.manifest import FORMAT_NAME, FORMAT_VERSION, read_manifest, write_json_atomic
from loaders.remote import NotRegularFileError, open_regular_file

JOURNAL_NAME = "ecomaug-convert-journal"
TAR_BLOCK = 512
DEFAULT_SHARD_SIZE = 1000
DEFAULT_MAX_SIZE = 384
DEFAULT_QUALITY = 90
DEFAULT_MIN_SIZE = 32
DEFAULT_MAX_PIXELS = 89_478_485
RESERVED_META = ("key", "source", "width", "height")
DISK_FULL_ERRNOS = tuple(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None)


class OutDirLocked(FileExistsError):
    """Another run of the same conversion job holds OUT_DIR's lock (``OUT_DIR/.lock``)."""


class DiskFullError(OSError):
    """The disk holding OUT_DIR filled up; this job's temporary files were removed and the
    journal kept, so the same command resumes once there is space."""

    def __str__(self) -> str:
        return self.strerror or "No space left on device"


@dataclass
class ConvertReport:
    """What a conversion did (also what ``manifest.json`` says, in short)."""

    out_dir: Path
    manifest_path: Path
    inputs: int
    written: int
    skipped: int
    bytes: int
    shards: int
    skipped_by_reason: dict[str, int]
    changed: int = 0
    passed_through: int = 0
    resumed: bool = False
    already_complete: bool = False
    seconds: float = 0.0
    processed: int = 0  # inputs handled by this call (less than ``inputs`` when resumed)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Task:
    """One input in this job's order: either work for a process or a skip decided up front."""

    item: InputItem
    key: str
    skip: dict[str, Any] | None = None


@dataclass
class _Names:
    prefix: str
    manifest: Path
    skipped: Path
    journal: Path
    lock: Path
    shard_pattern: re.Pattern


def _job_names(out_dir: Path, prefix: str, num_jobs: int, job_index: int) -> _Names:
    if num_jobs > 1:
        job_prefix, suffix = f"{prefix}-j{job_index:03d}", f"-j{job_index:03d}"
    else:
        job_prefix, suffix = prefix, ""
    return _Names(prefix=job_prefix, manifest=out_dir / f"manifest{suffix}.json",
                  skipped=out_dir / f"skipped{suffix}.jsonl",
                  journal=out_dir / f".convert-journal{suffix}.jsonl", lock=out_dir / f".lock{suffix}",
                  shard_pattern=re.compile(rf"^\.?{re.escape(job_prefix)}-\d{{6}}\.(tar|idx)(\..*\.tmp)?$"))


# ----------------------------------------------------------------------------- worker side
_WORKER_STATE: dict[str, Any] = {}


def _init_worker(options: HygieneOptions, image_hook: ImageHook | None, pooled: bool = False) -> None:
    _WORKER_STATE["options"] = options
    _WORKER_STATE["hook"] = image_hook
    if pooled:  # a process per core: more intra-op threads would only compete
        use_one_torch_thread()
        # A forked worker inherits the parent's handlers; one that only notes SIGTERM (train.py's
        # stop-at-a-step-boundary handler) would outlive Pool.terminate() and hang its join.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _process_one(path: str) -> Prepared | Rejected:
    try:
        with open_regular_file(path) as stream:  # a FIFO named in a manifest would block open()
            data = stream.read()
    except FileNotFoundError:
        return Rejected("missing file", path)
    except NotRegularFileError as error:
        return Rejected(NOT_REGULAR, error.kind)
    except OSError as error:
        return Rejected("unreadable file", f"{type(error).__name__}: {error}".splitlines()[0])
    return prepare_image(data, _WORKER_STATE["options"], _WORKER_STATE["hook"])


def _process_chunk(paths: list[str]) -> list[Prepared | Rejected]:
    return [_process_one(path) for path in paths]


# ----------------------------------------------------------------------------- planning
def _plan(listing: InputListing, *, balance_by: str | None, per_group: int | None, seed: int,
          shuffle: bool, num_jobs: int, job_index: int) -> list[_Task]:
    """This job's inputs in their final order, with up-front skips (repeats, not sampled)."""
    tasks: list[_Task] = []
    first_of: dict[str, str] = {}
    for item in listing.items:
        key = item.key
        task = _Task(item=item, key=key)
        if item.problem is not None:  # a FIFO, device, dangling link or link loop in a folder
            task.skip = {"reason": NOT_REGULAR, "detail": item.problem}
        elif key in first_of:
            task.skip = {"reason": "repeated input", "duplicate_of": key,
                         "detail": "the same path is listed more than once"}
        else:
            first_of[key] = item.identity
        tasks.append(task)

    if balance_by is not None:
        groups: dict[str, list[_Task]] = collections.defaultdict(list)
        for task in tasks:
            if task.skip is not None:
                continue
            value = task.item.meta.get(balance_by)
            if value is None or str(value) == "":
                task.skip = {"reason": "no group value", "detail": f"empty '{balance_by}'"}
            else:
                groups[str(value)].append(task)
        quota = per_group if per_group is not None else min((len(g) for g in groups.values()), default=0)
        for value in sorted(groups):
            members = groups[value]
            if len(members) <= quota:
                continue
            # One generator per group, seeded by (seed, group): adding a group changes no other.
            chosen = set(random.Random(f"{seed}:{balance_by}:{value}").sample(range(len(members)), quota))
            for position, task in enumerate(members):
                if position not in chosen:
                    task.skip = {"reason": "not sampled",
                                 "detail": f"{balance_by}={value}: {quota} of {len(members)} kept"}

    if shuffle:
        random.Random(seed).shuffle(tasks)
    # A key decides the job, so N jobs split the same selection into disjoint parts.
    return [task for task in tasks if int(task.key[:8], 16) % num_jobs == job_index]


def _inputs_digest(tasks: Sequence[_Task]) -> str:
    digest = hashlib.sha1()
    for task in tasks:
        digest.update(task.key.encode())
        digest.update(b"-" if task.skip is None else task.skip["reason"].encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- journal
def _read_journal(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int]:
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


def _append_journal(stream, record: dict[str, Any]) -> None:
    stream.write((json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8", NAME_ERRORS))
    stream.flush()
    os.fsync(stream.fileno())


def _fsync_directory(directory: Path) -> None:
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


# ----------------------------------------------------------------------------- shard writer
class _ShardWriter:
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
        json_data = jpg_data + _padded(len(jpeg)) + TAR_BLOCK
        if self.writer.offset != json_data + _padded(len(meta_json)):
            raise RuntimeError("unexpected tar layout from tarfile; cannot index the shard")
        self.index_lines.append(f"jpg {jpg_data} {len(jpeg)} {key}.jpg "
                                f"json {json_data} {len(meta_json)} {key}.json")
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
        with open(index_temporary, "w", encoding="ascii") as stream:
            # Byte for byte what DALI's wds2idx writes (format v1.2).
            stream.write(f"v1.2 {self.count}\n")
            for line in self.index_lines:
                stream.write(line + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(index_temporary, self.out_dir / self.index_name)
        os.replace(self.temporary, self.out_dir / self.tar_name)
        _fsync_directory(self.out_dir)
        return {"tar": self.tar_name, "index": self.index_name, "count": self.count,
                "bytes": size, "groups": self.groups}

    def abandon(self) -> None:
        for close in (self.writer.close, self.stream.close):
            try:  # the file goes anyway; closing flushes, which fails again on a full disk
                close()
            except Exception:  # noqa: BLE001
                pass
        self.temporary.unlink(missing_ok=True)


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def _final_tar_size(offset: int) -> int:
    # tarfile ends an archive with two zero blocks and pads it to a whole 10 KiB record.
    return -(-(offset + 2 * TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


# ----------------------------------------------------------------------------- main entry
def _validate(shard_size: int, shard_bytes: int | None, per_group: int | None, balance_by: str | None,
              num_jobs: int, job_index: int, workers: int, prefix: str) -> None:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1 (got {shard_size})")
    if shard_bytes is not None and shard_bytes < tarfile.RECORDSIZE:
        raise ValueError(f"shard_bytes must be at least {tarfile.RECORDSIZE} (got {shard_bytes})")
    if per_group is not None and per_group < 1:
        raise ValueError(f"per_group must be >= 1 (got {per_group})")
    if per_group is not None and balance_by is None:
        raise ValueError("per_group needs balance_by (the column whose groups are sampled evenly)")
    if num_jobs < 1:
        raise ValueError(f"num_jobs must be >= 1 (got {num_jobs})")
    if not 0 <= job_index < num_jobs:
        raise ValueError(f"job_index must be in 0..{num_jobs - 1} (got {job_index})")
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (got {workers})")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", prefix):
        raise ValueError(f"prefix must be letters, digits, '_' or '-' (got {prefix!r})")


def _hook_name(image_hook: ImageHook | None) -> str | None:
    """How the recorded options name a hook: a hook object that describes its settings in its
    ``repr`` (like ``Dewatermarker``) is recorded by that, so a rerun with other settings is refused
    rather than mixed into the same shards; a function by its qualified name."""
    if image_hook is None:
        return None
    if not callable(getattr(image_hook, "func", None)) and type(image_hook).__repr__ is not object.__repr__ \
            and not hasattr(image_hook, "__qualname__"):
        return repr(image_hook)
    target = getattr(image_hook, "func", image_hook)  # functools.partial
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"


def _check_out_dir(out_dir: Path, input_path: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(20, "OUT_DIR is not a directory", str(out_dir))
    if input_path.is_dir():
        try:
            out_dir.resolve().relative_to(input_path.resolve())
        except ValueError:
            return
        raise ValueError(f"OUT_DIR {out_dir} is inside the INPUT folder {input_path}; "
                         f"its shards would become inputs of the next run")


def _check_siblings(out_dir: Path, names: _Names, fingerprint: dict[str, Any]) -> None:
    """Refuse an output folder that holds another conversion (other input, options or split)."""
    mine = {key: value for key, value in fingerprint.items() if key != "job_index"}
    for path in sorted(out_dir.glob("manifest*.json")):
        if path == names.manifest:
            continue
        try:
            other = read_manifest(path)
        except ValueError as error:
            raise ValueError(f"OUT_DIR holds a manifest that is not from this conversion ({error}); "
                             f"use an empty directory") from error
        theirs = dict(other.get("options", {}))
        theirs.update(input=other.get("input"), num_jobs=other.get("job", {}).get("count"))
        _raise_if_different(mine, {key: theirs.get(key) for key in mine}, path)


def _raise_if_different(expected: dict[str, Any], found: dict[str, Any], where: Path) -> None:
    differences = [f"{key} {found.get(key)!r} != {value!r}" for key, value in expected.items()
                   if found.get(key) != value]
    if differences:
        raise ValueError(f"{where} belongs to a conversion with other input or options "
                         f"({'; '.join(differences[:3])}); use an empty OUT_DIR or the same options")


@contextlib.contextmanager
def _out_dir_lock(path: Path) -> Iterator[None]:
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


def _remove_temporaries(out_dir: Path, names: _Names) -> list[str]:
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


def _disk_full(error: OSError, out_dir: Path, names: _Names) -> DiskFullError:
    _remove_temporaries(out_dir, names)
    try:
        free = f"{shutil.disk_usage(out_dir).free / 1e6:.1f} MB free there now"
    except OSError:
        free = "free space unknown"
    where = f" ({error.filename})" if error.filename else ""
    return DiskFullError(error.errno, f"the disk is full: no space left on the device holding OUT_DIR "
                                      f"{out_dir}{where}, {free}; temporary files removed. Free space or "
                                      f"pick another OUT_DIR, then run the same command again to resume",
                         str(out_dir))


def convert_to_shards(input_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                      prefix: str = "shard", shard_size: int = DEFAULT_SHARD_SIZE,
                      shard_bytes: int | None = None, max_size: int = DEFAULT_MAX_SIZE,
                      resize_side: str = "longer", quality: int = DEFAULT_QUALITY,
                      min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS,
                      path_column: str = "path", balance_by: str | None = None,
                      per_group: int | None = None, seed: int = 0, shuffle: bool = False,
                      num_jobs: int = 1, job_index: int = 0, workers: int | None = None,
                      progress: bool = True, image_hook: ImageHook | None = None,
                      start_method: str | None = None) -> ConvertReport:
    """Convert a folder or manifest of images into WebDataset shards.

    Args:
        input_path: a folder (recursive; types decided by content) or a ``.csv`` / ``.jsonl``
            manifest with a path column; other manifest columns go into each ``<key>.json``.
        out_dir: where shards, indexes, ``manifest.json`` and ``skipped.jsonl`` go (created).
        prefix: shard file prefix; with ``num_jobs > 1`` it becomes ``{prefix}-j{job_index:03d}``.
        shard_size: most samples per shard.
        shard_bytes: most bytes per shard (optional): a shard closes before it would exceed it;
            a single sample larger than this gets a shard of its own.
        max_size: cap in pixels of the longer (or shorter, see ``resize_side``) side; never
            enlarges. The default 384 keeps the shorter side of 4:3 photos at 288 >= 256, the
            eval resize for 224-px crops, and leaves headroom for scale-0.2 random crops.
        resize_side: ``"longer"`` or ``"shorter"``.
        quality: JPEG quality when re-encoding.
        min_size: images whose shorter side is below this are skipped (``too small``).
        max_pixels: decompression-bomb limit; larger images are skipped (``too many pixels``).
        path_column: the manifest column holding the image path.
        balance_by: manifest column to sample evenly by (for example ``region``).
        per_group: inputs kept per group (default: the smallest group's size); the rest are
            skipped as ``not sampled``. Deterministic under ``seed``.
        seed: seed of the per-group sampling and of ``shuffle``.
        shuffle: write the inputs in a seeded random order instead of input order.
        num_jobs: split the inputs deterministically (by key) into this many jobs ...
        job_index: ... and convert only this one (0-based); together they equal one run.
        workers: worker processes (default: all CPUs; 0 runs in this process).
        progress: show a tqdm bar with images/s.
        image_hook: optional picklable ``hook(rgb_image) -> (image, meta_update, changed)``
            run in the workers on each cleaned image at its output size; changed images are
            re-encoded, ``meta_update`` is merged into the sample's json, and the manifest's
            ``totals.changed`` counts them.
        start_method: how worker processes start (``"fork"``, ``"spawn"``, ``"forkserver"``);
            default ``"fork"`` where available (fast start). Use ``"spawn"`` when the hook needs
            CUDA or this process has already initialised it.

    Returns:
        A :class:`ConvertReport`. Running again after completion returns the finished report;
        running again after a crash resumes.

    Raises:
        FileNotFoundError: ``input_path`` does not exist.
        ValueError: bad options, an empty input, an unknown manifest column, or an ``out_dir``
            that holds a conversion with different input or options.
        PermissionError: ``out_dir`` cannot be written.
        OutDirLocked: another run of this job is writing into ``out_dir`` (a FileExistsError).
        DiskFullError: the disk filled up (an OSError; temporary files are removed and the
            same command resumes).
    """
    started = time.perf_counter()
    workers = (os.cpu_count() or 1) if workers is None else workers
    _validate(shard_size, shard_bytes, per_group, balance_by, num_jobs, job_index, workers, prefix)
    methods = multiprocessing.get_all_start_methods()
    if start_method is None:
        start_method = "fork" if "fork" in methods else methods[0]
    if start_method not in methods:
        raise ValueError(f"start_method must be one of {methods} (got {start_method!r})")
    options = HygieneOptions(max_size=max_size, resize_side=resize_side, quality=quality,
                             min_size=min_size, max_pixels=max_pixels)
    input_path, out_dir = Path(input_path), Path(out_dir)
    listing = read_inputs(input_path, path_column=path_column)
    if balance_by is not None and balance_by not in listing.columns:
        where = "a folder input has no columns" if listing.kind == "folder" else \
            f"columns: {', '.join(listing.columns) or 'none'}"
        raise ValueError(f"balance_by column '{balance_by}' is not in {input_path} ({where})")
    _check_out_dir(out_dir, input_path)

    group_columns = [balance_by] if balance_by else [c for c in ("region",) if c in listing.columns]
    recorded_options = {
        "prefix": prefix, "shard_size": shard_size, "shard_bytes": shard_bytes, "max_size": max_size,
        "resize_side": resize_side, "quality": quality, "min_size": min_size,
        "max_pixels": max_pixels, "path_column": path_column, "balance_by": balance_by,
        "per_group": per_group, "seed": seed, "shuffle": shuffle,
        "image_hook": _hook_name(image_hook),
    }
    fingerprint = {**recorded_options, "input": str(input_path.resolve()), "num_jobs": num_jobs,
                   "job_index": job_index}
    tasks = _plan(listing, balance_by=balance_by, per_group=per_group, seed=seed, shuffle=shuffle,
                  num_jobs=num_jobs, job_index=job_index)
    del listing
    names = _job_names(out_dir, prefix, num_jobs, job_index)

    if names.manifest.exists():
        return _finished_report(names, fingerprint, len(tasks), started)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise PermissionError(13, "Permission denied (OUT_DIR is not writable)", str(out_dir))
    try:
        with _out_dir_lock(names.lock):
            if names.manifest.exists():  # another run finished while this one was starting
                return _finished_report(names, fingerprint, len(tasks), started)
            try:
                return _convert_job(tasks, names, out_dir=out_dir, fingerprint=fingerprint,
                                    recorded_options=recorded_options, num_jobs=num_jobs,
                                    job_index=job_index, group_columns=group_columns, options=options,
                                    image_hook=image_hook, shard_size=shard_size, shard_bytes=shard_bytes,
                                    workers=workers, progress=progress, start_method=start_method,
                                    started=started)
            except OSError as error:
                if error.errno not in DISK_FULL_ERRNOS or isinstance(error, DiskFullError):
                    raise
                raise _disk_full(error, out_dir, names) from error
    except OSError as error:  # the lock file itself could not be made
        if error.errno not in DISK_FULL_ERRNOS or isinstance(error, DiskFullError):
            raise
        raise _disk_full(error, out_dir, names) from error


def _convert_job(tasks: list[_Task], names: _Names, *, out_dir: Path, fingerprint: dict[str, Any],
                 recorded_options: dict[str, Any], num_jobs: int, job_index: int,
                 group_columns: list[str], options: HygieneOptions, image_hook: ImageHook | None,
                 shard_size: int, shard_bytes: int | None, workers: int, progress: bool,
                 start_method: str, started: float) -> ConvertReport:
    """The conversion proper, run while this job holds OUT_DIR's lock: resume or start the
    journal, write the shards, then skipped.jsonl and manifest.json."""
    _check_siblings(out_dir, names, fingerprint)

    header = {"journal": JOURNAL_NAME, "version": 1, "fingerprint": fingerprint,
              "inputs": len(tasks), "inputs_digest": _inputs_digest(tasks)}
    found_header, entries, good_length = _read_journal(names.journal)
    if found_header is not None:
        _raise_if_different(
            {**fingerprint, "inputs": len(tasks), "inputs_digest": header["inputs_digest"]},
            {**found_header.get("fingerprint", {}), "inputs": found_header.get("inputs"),
             "inputs_digest": found_header.get("inputs_digest")}, names.journal)
    known_files = {name for entry in entries if entry.get("shard")
                   for name in (entry["shard"]["tar"], entry["shard"]["index"])}
    strays = [p for p in out_dir.iterdir() if names.shard_pattern.match(p.name) and p.name not in known_files]
    if found_header is None and any(not p.name.startswith(".") for p in strays):
        raise ValueError(f"OUT_DIR {out_dir} already holds shards named {names.prefix}-*.tar from "
                         f"another run; use an empty directory or another --prefix")
    for path in strays:  # shards of a crashed run that the journal never recorded, temporaries
        path.unlink()

    with open(names.journal, "r+b" if found_header is not None else "wb") as journal:
        if found_header is None:
            _append_journal(journal, header)
        else:
            journal.truncate(good_length)  # drop a torn last line
            journal.seek(good_length)
        state = _State.from_entries(entries)
        processed = _run(tasks, state, journal, out_dir=out_dir, names=names, options=options,
                         image_hook=image_hook, shard_size=shard_size, shard_bytes=shard_bytes,
                         group_columns=group_columns, workers=workers, progress=progress,
                         start_method=start_method)

    manifest = _write_outputs(names, recorded_options, fingerprint, num_jobs, job_index, len(tasks),
                              group_columns)
    names.journal.unlink()
    _fsync_directory(out_dir)
    return _report(names, manifest, resumed=found_header is not None, processed=processed,
                   seconds=time.perf_counter() - started)


@dataclass
class _State:
    """What earlier journal entries settled: inputs consumed, shards, duplicate digests."""

    consumed: int = 0
    next_shard: int = 0
    by_bytes: dict[str, str] = field(default_factory=dict)
    by_pixels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_entries(cls, entries: list[dict[str, Any]]) -> "_State":
        state = cls()
        for entry in entries:
            state.consumed = entry["consumed"]
            if entry.get("shard"):
                state.next_shard += 1
            for key, bytes_digest, pixel_digest in entry.get("samples", ()):
                state.by_bytes.setdefault(bytes_digest, key)
                state.by_pixels.setdefault(pixel_digest, key)
        return state


def _results(tasks: Sequence[_Task], start: int, options: HygieneOptions, image_hook: ImageHook | None,
             workers: int, start_method: str) -> Iterator[tuple[_Task, Prepared | Rejected | None]]:
    """Yield (task, outcome) in task order; outcome None for up-front skips.

    Work goes out in chunks with a bounded number in flight, so memory stays flat however
    many inputs there are.
    """
    remaining = len(tasks) - start
    if workers == 0:
        _init_worker(options, image_hook)
        for task in tasks[start:]:
            yield task, None if task.skip is not None else _process_one(task.item.path)
        return
    # Small chunks: an image costs milliseconds and a task well under one, and small chunks keep
    # the workers evenly busy to the very end.
    chunk_size = max(1, min(4, remaining // (workers * 64)))
    if start_method == "fork":
        # The workers resize with torch: imported once here, each forked worker shares it, rather
        # than one import (~1.5 s of CPU and its memory) per worker at its first resize.
        import loaders.crops  # noqa: F401
    pool = multiprocessing.get_context(start_method).Pool(workers, initializer=_init_worker,
                                                          initargs=(options, image_hook, True))
    try:
        in_flight: collections.deque = collections.deque()
        position = start

        def submit() -> None:
            nonlocal position
            chunk = tasks[position:position + chunk_size]
            position += len(chunk)
            paths = [task.item.path for task in chunk if task.skip is None]
            in_flight.append((chunk, pool.apply_async(_process_chunk, (paths,)) if paths else None))

        while position < len(tasks) and len(in_flight) < workers * 8:
            submit()
        while in_flight:
            chunk, pending = in_flight.popleft()
            outcomes = iter(pending.get() if pending is not None else ())
            if position < len(tasks):
                submit()
            for task in chunk:
                yield task, None if task.skip is not None else next(outcomes)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _run(tasks: Sequence[_Task], state: _State, journal, *, out_dir: Path, names: _Names,
         options: HygieneOptions, image_hook: ImageHook | None, shard_size: int,
         shard_bytes: int | None, group_columns: list[str], workers: int, progress: bool,
         start_method: str) -> int:
    """Process the not-yet-settled tasks; returns how many were processed."""
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), initial=state.consumed, unit="img", disable=not progress,
               desc=names.prefix, dynamic_ncols=True, smoothing=0.1)
    start = consumed = state.consumed
    pending_skips: list[dict[str, Any]] = []
    pending_samples: list[list[str]] = []
    pending_counts = {"changed": 0, "passed_through": 0}
    writer: _ShardWriter | None = None
    written = skipped = 0

    def commit() -> None:
        nonlocal writer
        shard_entry = writer.finish() if writer is not None and writer.count else None
        if writer is not None and not writer.count:
            writer.abandon()
        if shard_entry is not None:
            state.next_shard += 1
        _append_journal(journal, {"consumed": consumed, "shard": shard_entry, "skipped": pending_skips,
                                  "samples": pending_samples, **pending_counts})
        writer = None
        pending_skips.clear()
        pending_samples.clear()
        pending_counts.update(changed=0, passed_through=0)

    def skip(task: _Task, reason: str, detail: str = "", duplicate_of: str | None = None) -> None:
        nonlocal skipped
        record = {"source": task.item.identity, "key": task.key, "reason": reason}
        if duplicate_of is not None:
            record["duplicate_of"] = duplicate_of
        if detail:
            record["detail"] = detail
        pending_skips.append(record)
        skipped += 1

    try:
        for task, outcome in _results(tasks, state.consumed, options, image_hook, workers, start_method):
            if task.skip is not None:
                skip(task, task.skip["reason"], task.skip.get("detail", ""), task.skip.get("duplicate_of"))
            elif isinstance(outcome, Rejected):
                skip(task, outcome.reason, outcome.detail)
            elif outcome.bytes_digest in state.by_bytes:
                skip(task, "duplicate bytes", "", state.by_bytes[outcome.bytes_digest])
            elif outcome.pixel_digest in state.by_pixels:
                skip(task, "duplicate pixels", "", state.by_pixels[outcome.pixel_digest])
            else:
                meta = {key: value for key, value in {**task.item.meta, **outcome.meta}.items()
                        if key not in RESERVED_META}
                meta = {"key": task.key, "source": task.item.identity, "width": outcome.width,
                        "height": outcome.height, **meta}
                meta_json = json.dumps(meta, ensure_ascii=False, sort_keys=False).encode("utf-8", NAME_ERRORS)
                sample_bytes = 2 * TAR_BLOCK + _padded(len(outcome.jpeg)) + _padded(len(meta_json))
                if (writer is not None and writer.count and shard_bytes is not None
                        and _final_tar_size(writer.bytes + sample_bytes) > shard_bytes):
                    commit()  # this sample opens the next shard
                if writer is None:
                    writer = _ShardWriter(out_dir, f"{names.prefix}-{state.next_shard:06d}")
                writer.write(task.key, outcome.jpeg, meta_json)
                for column in group_columns:
                    if meta.get(column) not in (None, ""):
                        writer.count_group(column, meta[column])
                state.by_bytes[outcome.bytes_digest] = task.key
                state.by_pixels.setdefault(outcome.pixel_digest, task.key)
                pending_samples.append([task.key, outcome.bytes_digest, outcome.pixel_digest])
                pending_counts["changed"] += int(outcome.changed)
                pending_counts["passed_through"] += int(outcome.passed_through)
                written += 1
            consumed += 1
            bar.update(1)
            if writer is not None and writer.count >= shard_size:
                commit()
                bar.set_postfix(written=written, skipped=skipped, refresh=False)
        commit()  # the last, partial shard and the last skips
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    finally:
        bar.close()
    return consumed - start


def _iter_entries(journal_path: Path) -> Iterator[dict[str, Any]]:
    with open(journal_path, "rb") as stream:
        next(stream)  # header
        for raw in stream:
            yield json.loads(raw)


def _write_outputs(names: _Names, recorded_options: dict[str, Any], fingerprint: dict[str, Any],
                   num_jobs: int, job_index: int, inputs: int, group_columns: list[str]) -> dict[str, Any]:
    """skipped.jsonl and manifest.json from the journal, each written atomically."""
    shards: list[dict[str, Any]] = []
    groups: dict[str, dict[str, int]] = {column: {} for column in group_columns}
    totals = {"inputs": inputs, "written": 0, "skipped": 0, "bytes": 0, "skipped_by_reason": {},
              "changed": 0, "passed_through": 0}
    temporary = names.skipped.with_name(f".{names.skipped.name}.tmp")
    with open(temporary, "w", encoding="utf-8", errors=NAME_ERRORS) as skipped_stream:
        for entry in _iter_entries(names.journal):
            for record in entry["skipped"]:
                skipped_stream.write(json.dumps(record, ensure_ascii=False) + "\n")
                totals["skipped"] += 1
                reasons = totals["skipped_by_reason"]
                reasons[record["reason"]] = reasons.get(record["reason"], 0) + 1
            totals["changed"] += entry.get("changed", 0)
            totals["passed_through"] += entry.get("passed_through", 0)
            shard = entry.get("shard")
            if shard:
                shards.append(shard)
                totals["written"] += shard["count"]
                totals["bytes"] += shard["bytes"]
                for column, values in shard["groups"].items():
                    for value, count in values.items():
                        groups.setdefault(column, {})[value] = groups.get(column, {}).get(value, 0) + count
        skipped_stream.flush()
        os.fsync(skipped_stream.fileno())
    os.replace(temporary, names.skipped)
    if totals["written"] + totals["skipped"] != inputs:
        raise RuntimeError(f"internal error: {totals['written']} written + {totals['skipped']} skipped "
                           f"!= {inputs} inputs; the journal {names.journal} is kept for inspection")
    from ecomaug import __version__

    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "ecomaug_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": fingerprint["input"], "options": recorded_options,
        "job": {"index": job_index, "count": num_jobs},
        "shards": shards, "groups": groups, "totals": totals,
    }
    write_json_atomic(names.manifest, manifest)
    return manifest


def _report(names: _Names, manifest: dict[str, Any], *, resumed: bool = False,
            already_complete: bool = False, processed: int = 0, seconds: float = 0.0) -> ConvertReport:
    totals = manifest["totals"]
    return ConvertReport(out_dir=names.manifest.parent, manifest_path=names.manifest,
                         inputs=totals["inputs"], written=totals["written"], skipped=totals["skipped"],
                         bytes=totals["bytes"], shards=len(manifest["shards"]),
                         skipped_by_reason=dict(totals["skipped_by_reason"]),
                         changed=totals.get("changed", 0), passed_through=totals.get("passed_through", 0),
                         resumed=resumed, already_complete=already_complete, processed=processed,
                         seconds=seconds)


def _finished_report(names: _Names, fingerprint: dict[str, Any], inputs: int, started: float) -> ConvertReport:
    manifest = read_manifest(names.manifest)
    found = dict(manifest.get("options", {}))
    found.update(input=manifest.get("input"), num_jobs=manifest.get("job", {}).get("count"),
                 job_index=manifest.get("job", {}).get("index"))
    _raise_if_different(fingerprint, found, names.manifest)
    if manifest["totals"]["inputs"] != inputs:
        raise ValueError(f"{names.manifest} was written for {manifest['totals']['inputs']} inputs but the "
                         f"input now has {inputs}; convert into an empty OUT_DIR")
    names.journal.unlink(missing_ok=True)  # a crash between writing the manifest and this cleanup
    return _report(names, manifest, already_complete=True, seconds=time.perf_counter() - started)
