"""``ecomaug shard``: a folder or manifest of listing images (or of their URLs) -> WebDataset shards with
DALI indexes."""

from __future__ import annotations

import re

import click

from ecomaug.commands import FloatRange
from ecomaug.limits import (MAX_FETCH_BYTES, MAX_FETCH_RETRIES, MAX_FETCH_THREADS, MAX_FETCH_TIMEOUT,
                            MAX_FETCHES_PER_HOST, MAX_IMAGE_SIDE, MAX_SEED, MAX_WORKERS)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | None, name: str = "--shard-bytes") -> int | None:
    """``"500MB"`` -> 500000000; ``"1GiB"`` -> 1073741824; a bare number is bytes (``name``: the option, for
    the message)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{name} {text!r} is not a size; use e.g. 500MB, 1GB, 1GiB or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_max_bytes(text: str) -> int:
    """``--max-bytes`` in bytes, in 1 .. :data:`~ecomaug.limits.MAX_FETCH_BYTES`."""
    size = parse_size(text, "--max-bytes")
    if not 1 <= size <= MAX_FETCH_BYTES:
        raise ValueError(f"--max-bytes must be between 1 byte and {MAX_FETCH_BYTES // 10**6}MB (got {text!r})")
    return size


@click.command("shard")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=str))
@click.argument("out_dir", metavar="OUT_DIR", type=click.Path(path_type=str))
@click.option("--max-size", type=click.IntRange(1, MAX_IMAGE_SIDE), default=384, show_default=True,
              help="Cap of the longer side in px (never enlarges); 384 suits 224-px training.")
@click.option("--resize-side", type=click.Choice(["longer", "shorter"]), default="longer", show_default=True,
              help="Which side --max-size caps.")
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True,
              help="JPEG quality when re-encoding.")
@click.option("--min-size", type=click.IntRange(1, MAX_IMAGE_SIDE), default=32, show_default=True,
              help="Skip images whose shorter side is below this, before or after the resize to "
                   "--max-size (reason 'too small'); at most --max-size.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=89_478_485, show_default=True,
              help="Decompression-bomb limit: skip larger images (reason 'too many pixels').")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Most samples per shard.")
@click.option("--shard-bytes", type=str, default=None,
              help="Most bytes per shard, e.g. 500MB or 1GiB (optional, with --shard-size).")
@click.option("--prefix", type=str, default="shard", show_default=True, help="Shard file name prefix.")
@click.option("--path-column", type=str, default="path", show_default=True,
              help="Manifest column holding the image path (relative to the manifest).")
@click.option("--url-column", type=str, default=None,
              help="Instead of --path-column: the manifest column holding each image's http(s)://, s3:// or "
                   "gs:// URL. Other schemes (file://, bare paths, pipe:...) are skipped, never opened.")
@click.option("--fetch-threads", type=click.IntRange(1, MAX_FETCH_THREADS), default=64, show_default=True,
              help="URL lists: fetches in flight at once.")
@click.option("--per-host", type=click.IntRange(1, MAX_FETCHES_PER_HOST), default=16, show_default=True,
              help="URL lists: most fetches in flight to one host (or bucket).")
@click.option("--timeout", type=click.FloatRange(0, MAX_FETCH_TIMEOUT, min_open=True), default=10.0,
              show_default=True, help="URL lists: seconds to connect, and that a read may wait for data.")
@click.option("--retries", type=click.IntRange(0, MAX_FETCH_RETRIES), default=3, show_default=True,
              help="URL lists: further tries, with exponential backoff, after a timeout, a connection error, "
                   "HTTP 408, 429 or 5xx.")
@click.option("--max-bytes", type=str, default="20MB", show_default=True,
              help="URL lists: skip a response larger than this (reason 'too large').")
@click.option("--item-id-from", type=click.Choice(["column", "parent"]), default="column", show_default=True,
              help="Where each image's item_id comes from: the manifest's item_id column, or the name of "
                   "the folder holding the image (a folder tree of one sub-folder per item, no manifest).")
@click.option("--val-split", type=FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Hold out this fraction of the items (all their photos, seeded by --seed) as a "
                   "validation set, written to OUT_DIR/val (for ecomaug eval and train.py --val-data).")
@click.option("--balance-by", type=str, default=None,
              help="Manifest column to sample evenly by, e.g. region.")
@click.option("--per-group", type=click.IntRange(min=1), default=None,
              help="Inputs kept per --balance-by group (default: the smallest group's size).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of the sampling and --shuffle.")
@click.option("--shuffle/--no-shuffle", default=False, show_default=True,
              help="Write inputs in a seeded random order rather than input order.")
@click.option("--num-jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the input into this many jobs (e.g. a job array) ...")
@click.option("--job-index", type=click.IntRange(min=0), default=0, show_default=True,
              help="... and convert only this one (0-based; e.g. $SLURM_ARRAY_TASK_ID).")
@click.option("--workers", type=click.IntRange(0, MAX_WORKERS), default=None,
              help="Worker processes. Default: one per CPU core.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.option("--staging", type=click.Path(file_okay=False, path_type=str), default=None,
              help="When OUT_DIR is object storage (s3://bucket/prefix, gs://..., needs ecomaug[s3] or [gcs]): "
                   "the local folder where each shard is written, then uploaded and removed, and the journal "
                   "that resumes a crashed run is kept. Default: ~/.cache/ecomaug/staging/<hash of OUT_DIR>.")
def shard(input_path: str, out_dir: str, max_size: int, resize_side: str, quality: int, min_size: int,
          max_pixels: int, shard_size: int, shard_bytes: str | None, prefix: str, path_column: str,
          url_column: str | None, fetch_threads: int, per_host: int, timeout: float, retries: int, max_bytes: str,
          item_id_from: str, val_split: float | None, balance_by: str | None, per_group: int | None, seed: int,
          shuffle: bool, num_jobs: int, job_index: int, workers: int | None, progress: bool,
          staging: str | None) -> None:
    """Convert INPUT (a folder of images, or a .csv/.jsonl/.parquet manifest) into shards in OUT_DIR.

    Writes shard-NNNNNN.tar (<key>.jpg + <key>.json), a DALI index .idx per shard, manifest.json
    and skipped.jsonl (every input not written, with the reason). Running the same command
    again after a crash resumes; after completion it does nothing.

    With --url-column, INPUT lists image URLs (http, https, s3, gs), fetched many at once with
    timeouts, retries and a size cap; each failed one is skipped with its reason (HTTP 404,
    timeout, connection refused, too large, not an image...). A re-run fetches only what the
    last closed shard does not already hold.

    \b
    Examples:
      ecomaug shard ecomaug/assets/sample/items.csv ./shards --shard-size 64
      ecomaug shard ./images ./shards --max-size 384 --quality 90 --workers 8
      ecomaug shard ./my_photos ./shards --item-id-from parent --val-split 0.1
      ecomaug shard items.csv ./shards --balance-by region --per-group 1000000 --seed 0
      ecomaug shard items.csv ./shards --num-jobs 16 --job-index $SLURM_ARRAY_TASK_ID
      ecomaug shard urls.csv ./shards --url-column url --timeout 10 --retries 3 --max-bytes 20MB
      ecomaug shard ./images s3://my-bucket/shards --staging /scratch/ecomaug-staging
    """
    from ecomaug.cli import CommandError
    from loaders.convert import DiskFullError, convert_to_shards
    from loaders.convert.fetch import FetchOptions
    from loaders.convert.remote_out import default_staging, is_remote

    fetch = None
    given = [f"--{name.replace('_', '-')}" for name in ("fetch_threads", "per_host", "timeout", "retries", "max_bytes")
             if click.get_current_context().get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
    if url_column is None and given:
        raise ValueError(f"{', '.join(given)} apply to a URL list: give --url-column too")
    if url_column is not None:
        fetch = FetchOptions(threads=fetch_threads, per_host=per_host, timeout=timeout, retries=retries,
                             max_bytes=parse_max_bytes(max_bytes), seed=seed)
    if is_remote(out_dir):
        click.echo(f"staging in {staging or default_staging(out_dir)}; each closed shard goes up to {out_dir}")
    try:
        report = convert_to_shards(
            input_path, out_dir, prefix=prefix, shard_size=shard_size, shard_bytes=parse_size(shard_bytes),
            max_size=max_size, resize_side=resize_side, quality=quality, min_size=min_size,
            max_pixels=max_pixels, path_column=path_column, item_id_from=item_id_from,
            val_split=val_split, balance_by=balance_by, per_group=per_group,
            seed=seed, shuffle=shuffle, num_jobs=num_jobs, job_index=job_index, workers=workers,
            progress=progress, url_column=url_column, fetch=fetch, staging=staging)
    except DiskFullError as error:  # an OSError, which the CLI otherwise leaves as a traceback
        raise CommandError(str(error)) from error
    _echo_report(report)
    if report.val is not None:
        click.echo(f"validation set (--val-split {val_split}, by item): {report.val.out_dir}")
        _echo_report(report.val)


def _echo_report(report) -> None:
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(report.skipped_by_reason.items()))
    if report.already_complete:
        click.echo(f"already complete: {report.manifest_path} ({report.written} written, "
                   f"{report.skipped} skipped); nothing to do")
        return
    click.echo(f"wrote {report.written} of {report.inputs} inputs into {report.shards} shards "
               f"({report.bytes / 1e6:.1f} MB) in {report.out_dir}"
               + (" (resumed)" if report.resumed else ""))
    click.echo(f"skipped {report.skipped}" + (f" ({reasons}); see skipped.jsonl" if reasons else ""))
    click.echo(f"{report.processed} images in {report.seconds:.1f} s: {report.images_per_second:.0f} images/s")
