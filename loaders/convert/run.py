"""``convert_to_shards``: list the inputs, plan this job, write the shards, then the manifest.

The pieces, one per file: :mod:`~loaders.convert.settings` (the options, checked),
:mod:`~loaders.convert.inputs` (what is read),
:mod:`~loaders.convert.plan` (in which order, which job, which split),
:mod:`~loaders.convert.workers` (cleaning in worker processes), :mod:`~loaders.convert.shard_writer`
(one shard on disk), :mod:`~loaders.convert.journal` (crash safety),
:mod:`~loaders.convert.out_dir` (lock, checks, a full disk) and :mod:`~loaders.convert.outputs`
(``manifest.json``, ``skipped.jsonl``, the report).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from loaders.atomic import DISK_FULL_ERRNOS
from loaders.convert.fetch import FetchOptions
from loaders.convert.hygiene import DEFAULT_MAX_PIXELS, ImageHook, Prepared, Rejected
from loaders.convert.inputs import InputListing
from loaders.convert.journal import JOURNAL_NAME, NAME_ERRORS, JournalState, append_journal, read_journal
from loaders.convert.out_dir import (DiskFullError, JobNames, check_siblings, disk_full, job_names, out_dir_lock,
                                     raise_if_different)
from loaders.convert.outputs import ConvertReport, finished_report, report, write_outputs
from loaders.convert.plan import Task, inputs_digest, plan_tasks, split_listing, validation_items
from loaders.convert.remote_out import local_out
from loaders.convert.settings import (DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE, DEFAULT_QUALITY, DEFAULT_SHARD_SIZE,
                                     JobSettings, job_settings)
from loaders.convert.shard_writer import TAR_BLOCK, ShardWriter, final_tar_size, fsync_directory, padded
from loaders.convert.workers import results_in_order

RESERVED_META = ("key", "source", "width", "height")
VAL_DIR = "val"  # where val_split writes the validation set: OUT_DIR/val


def convert_to_shards(input_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                      prefix: str = "shard", shard_size: int = DEFAULT_SHARD_SIZE, shard_bytes: int | None = None,
                      max_size: int = DEFAULT_MAX_SIZE, resize_side: str = "longer", quality: int = DEFAULT_QUALITY,
                      min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS, path_column: str = "path",
                      item_id_from: str = "column", balance_by: str | None = None, per_group: int | None = None,
                      seed: int = 0, shuffle: bool = False, val_split: float | None = None, num_jobs: int = 1,
                      job_index: int = 0, workers: int | None = None, progress: bool = True,
                      image_hook: ImageHook | None = None, start_method: str | None = None,
                      url_column: str | None = None, fetch: FetchOptions | None = None,
                      staging: str | os.PathLike | None = None) -> ConvertReport:
    """Convert a folder or manifest of images (or of image URLs) into WebDataset shards.

    Args:
        input_path: a folder (recursive; types decided by content) or a ``.csv``/``.jsonl``/``.parquet``
            manifest with a path (or URL) column; other manifest columns go into each ``<key>.json``.
        out_dir: where shards, indexes, ``manifest.json`` and ``skipped.jsonl`` go (created): a folder,
            or an fsspec URL (``s3://bucket/prefix``, ``gs://...``), written through ``staging``.
        prefix: shard file prefix; with ``num_jobs > 1`` it becomes ``{prefix}-j{job_index:03d}``.
        shard_size: most samples per shard.
        shard_bytes: most bytes per shard (optional): a shard closes before it would exceed it;
            a single sample larger than this gets a shard of its own.
        max_size: cap in pixels of the longer (or shorter, see ``resize_side``) side; never
            enlarges. The default 384 keeps the shorter side of 4:3 photos at 288 >= 256, the
            eval resize for 224-px crops, and leaves headroom for scale-0.2 random crops.
        resize_side: ``"longer"`` or ``"shorter"``.
        quality: JPEG quality when re-encoding.
        min_size: images whose shorter side is below this, as read or after the resize to
            ``max_size``, are skipped (``too small``); at most ``max_size``.
        max_pixels: decompression-bomb limit; larger images are skipped (``too many pixels``).
        path_column: the manifest column holding the image path.
        item_id_from: ``"column"`` (a manifest's ``item_id`` column, if any) or ``"parent"`` (the
            name of the folder holding each image: one sub-folder per item, no manifest needed).
        balance_by: manifest column to sample evenly by (for example ``region``).
        per_group: inputs kept per group (default: the smallest group's size); the rest are
            skipped as ``not sampled``. Deterministic under ``seed``.
        seed: seed of the per-group sampling, of ``shuffle`` and of ``val_split``.
        shuffle: write the inputs in a seeded random order instead of input order.
        val_split: hold out this fraction of the items (all photos of each, drawn with ``seed``)
            as a validation set in ``out_dir/val`` (a shard set of its own); both manifests
            record the split, and train + val inputs = all inputs.
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
        url_column: instead of ``path_column``, a column of http(s)/s3/gs URLs fetched as ``fetch`` says.
        staging: for a URL ``out_dir``, the local folder shards are written in before their upload (remote_out).

    Returns:
        A :class:`ConvertReport` (with ``val``, the validation set's, when ``val_split`` is
        given). Running again after completion returns the finished report; running again
        after a crash resumes.

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
    out, remote = local_out(out_dir, staging)  # remote: None for a local OUT_DIR
    listing, settings = job_settings(
        Path(input_path), out, prefix=prefix, shard_size=shard_size, shard_bytes=shard_bytes, max_size=max_size,
        resize_side=resize_side, quality=quality, min_size=min_size, max_pixels=max_pixels, path_column=path_column,
        item_id_from=item_id_from, balance_by=balance_by, per_group=per_group, seed=seed, shuffle=shuffle,
        val_split=val_split, num_jobs=num_jobs, job_index=job_index, workers=workers, progress=progress,
        image_hook=image_hook, start_method=start_method, url_column=url_column, fetch=fetch)
    plan = dict(balance_by=balance_by, per_group=per_group, seed=seed, shuffle=shuffle)
    result = _convert_split(listing, out, prefix, replace(settings, sink=remote), plan, started, val_split)
    return remote.published(result) if remote is not None else result


def _convert_split(listing: InputListing, out_dir: Path, prefix: str, settings: JobSettings,
                   plan: dict[str, Any], started: float, val_split: float | None) -> ConvertReport:
    """Hold out ``val_split`` of the items (seeded), convert the rest into ``out_dir`` and the
    held-out items into ``out_dir/val``; the train report carries the val one as ``val``. Without
    ``val_split``, convert them all into ``out_dir``."""
    if val_split is None:
        return _convert_listing(listing, out_dir, prefix, settings, plan, started)
    seed = plan["seed"]
    held_out = validation_items(listing, val_split, seed=seed)
    train, val = split_listing(listing, held_out)
    split = {"val_split": val_split, "seed": seed, "inputs": len(listing.items),
             "items": len({str(i.meta.get("item_id")) for i in listing.items if i.meta.get("item_id")}),
             "val_items": len(held_out), "train_inputs": len(train.items), "val_inputs": len(val.items),
             "train_dir": ".", "val_dir": VAL_DIR}
    result = _convert_listing(train, out_dir, prefix, replace(settings, split={**split, "part": "train"}),
                              plan, started)
    val_settings = replace(settings, split={**split, "part": "val"})
    result.val = _convert_listing(val, out_dir / VAL_DIR, prefix, val_settings, plan, time.perf_counter())
    return result


def _convert_listing(listing: InputListing, out_dir: Path, prefix: str, settings: JobSettings,
                     plan: dict[str, Any], started: float) -> ConvertReport:
    """Plan this job's share of ``listing`` and convert it into ``out_dir`` under the lock."""
    tasks = plan_tasks(listing, num_jobs=settings.num_jobs, job_index=settings.job_index, **plan)
    names = job_names(out_dir, prefix, settings.num_jobs, settings.job_index)
    if (finished := _finished(names, settings, len(tasks), started)) is not None:
        return finished
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise PermissionError(13, "Permission denied (OUT_DIR is not writable)", str(out_dir))
    try:
        with out_dir_lock(names.lock):
            if (finished := _finished(names, settings, len(tasks), started)) is not None:
                return finished  # another run finished while this one was starting
            try:
                return _convert_job(tasks, names, out_dir, settings, started)
            except OSError as error:
                if error.errno not in DISK_FULL_ERRNOS or isinstance(error, DiskFullError):
                    raise
                raise disk_full(error, out_dir, names) from error
    except OSError as error:  # the lock file itself could not be made
        if error.errno not in DISK_FULL_ERRNOS or isinstance(error, DiskFullError):
            raise
        raise disk_full(error, out_dir, names) from error


def _finished(names: JobNames, settings: JobSettings, inputs: int, started: float) -> ConvertReport | None:
    """The report of a job whose manifest is already written (on the store, for a URL OUT), else None."""
    if settings.sink is not None:
        return settings.sink.finished_report(names, settings.fingerprint, inputs, started)
    return finished_report(names, settings.fingerprint, inputs, started) if names.manifest.exists() else None


def _convert_job(tasks: list[Task], names: JobNames, out_dir: Path, settings: JobSettings,
                 started: float) -> ConvertReport:
    """The conversion proper, run while this job holds OUT_DIR's lock: resume or start the
    journal, write the shards, then skipped.jsonl and manifest.json."""
    fingerprint = settings.fingerprint
    check_siblings(out_dir, names, fingerprint, settings.sink.sibling_manifests(names) if settings.sink else None)
    header = {"journal": JOURNAL_NAME, "version": 1, "fingerprint": fingerprint,
              "inputs": len(tasks), "inputs_digest": inputs_digest(tasks)}
    found_header, entries, good_length = read_journal(names.journal)
    if found_header is not None:
        raise_if_different(
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
    if settings.sink is not None:  # check the store; upload again what a crash left unsent
        settings.sink.start(names, entries)

    with open(names.journal, "r+b" if found_header is not None else "wb") as journal:
        if found_header is None:
            append_journal(journal, header)
        else:
            journal.truncate(good_length)  # drop a torn last line
            journal.seek(good_length)
        job = _JobWriter(JournalState.from_entries(entries), journal, out_dir, names, settings)
        processed = job.run(tasks)

    manifest = write_outputs(names, settings.recorded_options, fingerprint, settings.num_jobs,
                             settings.job_index, len(tasks), settings.group_columns, settings.split)
    if settings.sink is not None:  # before the journal goes: a crash until the manifest is up resumes
        settings.sink.outputs_written(names)
    names.journal.unlink()
    fsync_directory(out_dir)
    return report(names, manifest, resumed=found_header is not None, processed=processed,
                  seconds=time.perf_counter() - started)


@dataclass
class _JobWriter:
    """Writes the not-yet-settled tasks into shards, one journal line per closed shard."""

    state: JournalState
    journal: BinaryIO
    out_dir: Path
    names: JobNames
    settings: JobSettings
    writer: ShardWriter | None = None
    consumed: int = 0
    written: int = 0
    skipped: int = 0
    pending_skips: list[dict[str, Any]] = field(default_factory=list)
    pending_samples: list[list[str]] = field(default_factory=list)
    pending_counts: dict[str, int] = field(default_factory=lambda: {"changed": 0, "passed_through": 0})

    def run(self, tasks: Sequence[Task]) -> int:
        """Process the tasks after the journal's settled prefix; returns how many were processed."""
        from tqdm import tqdm

        settings = self.settings
        start = self.consumed = self.state.consumed
        bar = tqdm(total=len(tasks), initial=start, unit="img", disable=not settings.progress,
                   desc=self.names.prefix, dynamic_ncols=True, smoothing=0.1)
        outcomes = results_in_order(tasks, start, settings.options, settings.image_hook, settings.workers,
                                    settings.start_method, settings.fetch)
        try:
            for task, outcome in outcomes:
                self.settle(task, outcome)
                self.consumed += 1
                bar.update(1)
                if self.writer is not None and self.writer.count >= settings.shard_size:
                    self.commit()
                    bar.set_postfix(written=self.written, skipped=self.skipped, refresh=False)
            self.commit()  # the last, partial shard and the last skips
        except BaseException:
            if self.writer is not None:
                self.writer.abandon()
            raise
        finally:
            bar.close()
        return self.consumed - start

    def settle(self, task: Task, outcome: Prepared | Rejected | None) -> None:
        """Write or skip one task, in order."""
        state = self.state
        if task.skip is not None:
            self.skip(task, task.skip["reason"], task.skip.get("detail", ""), task.skip.get("duplicate_of"))
        elif isinstance(outcome, Rejected):
            self.skip(task, outcome.reason, outcome.detail)
        elif outcome.bytes_digest in state.by_bytes:
            self.skip(task, "duplicate bytes", "", state.by_bytes[outcome.bytes_digest])
        elif outcome.pixel_digest in state.by_pixels:
            self.skip(task, "duplicate pixels", "", state.by_pixels[outcome.pixel_digest])
        else:
            self.write(task, outcome)

    def write(self, task: Task, outcome: Prepared) -> None:
        meta = {key: value for key, value in {**task.item.meta, **outcome.meta}.items()
                if key not in RESERVED_META}
        meta = {"key": task.key, "source": task.item.identity, "width": outcome.width,
                "height": outcome.height, **meta}
        meta_json = json.dumps(meta, ensure_ascii=False, sort_keys=False).encode("utf-8", NAME_ERRORS)
        sample_bytes = 2 * TAR_BLOCK + padded(len(outcome.jpeg)) + padded(len(meta_json))
        shard_bytes = self.settings.shard_bytes
        if (self.writer is not None and self.writer.count and shard_bytes is not None
                and final_tar_size(self.writer.bytes + sample_bytes) > shard_bytes):
            self.commit()  # this sample opens the next shard
        if self.writer is None:
            self.writer = ShardWriter(self.out_dir, f"{self.names.prefix}-{self.state.next_shard:06d}")
        self.writer.write(task.key, outcome.jpeg, meta_json)
        for column in self.settings.group_columns:
            if meta.get(column) not in (None, ""):
                self.writer.count_group(column, meta[column])
        self.state.by_bytes[outcome.bytes_digest] = task.key
        self.state.by_pixels.setdefault(outcome.pixel_digest, task.key)
        self.pending_samples.append([task.key, outcome.bytes_digest, outcome.pixel_digest])
        self.pending_counts["changed"] += int(outcome.changed)
        self.pending_counts["passed_through"] += int(outcome.passed_through)
        self.written += 1

    def skip(self, task: Task, reason: str, detail: str = "", duplicate_of: str | None = None) -> None:
        record = {"source": task.item.identity, "key": task.key, "reason": reason}
        if duplicate_of is not None:
            record["duplicate_of"] = duplicate_of
        if detail:
            record["detail"] = detail
        self.pending_skips.append(record)
        self.skipped += 1

    def commit(self) -> None:
        """Close the open shard (if it holds a sample) and journal what is settled so far."""
        writer = self.writer
        shard_entry = writer.finish() if writer is not None and writer.count else None
        if writer is not None and not writer.count:
            writer.abandon()
        if shard_entry is not None:
            self.state.next_shard += 1
        append_journal(self.journal, {"consumed": self.consumed, "shard": shard_entry,
                                      "skipped": self.pending_skips, "samples": self.pending_samples,
                                      **self.pending_counts})
        self.writer = None
        self.pending_skips = []
        self.pending_samples = []
        self.pending_counts = {"changed": 0, "passed_through": 0}
        if shard_entry is not None and self.settings.sink is not None:  # journaled first: a crash re-sends it
            self.settings.sink.shard_closed(self.out_dir, shard_entry)
