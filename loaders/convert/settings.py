"""One conversion job's options, checked once into a :class:`JobSettings`.

:func:`job_settings` validates what :func:`~loaders.convert.run.convert_to_shards` is given, lists
the inputs, checks OUT_DIR and gathers the options the manifest records (and the fingerprint a
resumed run must match).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loaders.convert.fetch import FetchOptions, check_backends
from loaders.convert.hygiene import HygieneOptions, ImageHook
from loaders.convert.inputs import ITEM_ID_SOURCES, InputListing, read_inputs
from loaders.convert.out_dir import check_out_dir

if TYPE_CHECKING:
    from loaders.convert.remote_out import RemoteOut

DEFAULT_SHARD_SIZE = 1000
DEFAULT_MAX_SIZE = 384
DEFAULT_QUALITY = 90
DEFAULT_MIN_SIZE = 32


@dataclass(frozen=True)
class JobSettings:
    """Everything one conversion job is run with, checked."""

    options: HygieneOptions
    image_hook: ImageHook | None
    shard_size: int
    shard_bytes: int | None
    group_columns: list[str]
    workers: int
    progress: bool
    start_method: str
    num_jobs: int
    job_index: int
    recorded_options: dict[str, Any]
    fingerprint: dict[str, Any]
    split: dict[str, Any] | None = None
    fetch: FetchOptions | None = None  # a URL list: how its images are fetched
    sink: RemoteOut | None = None  # an object-storage OUT: uploads each closed shard


def validate(shard_size: int, shard_bytes: int | None, per_group: int | None, balance_by: str | None,
             num_jobs: int, job_index: int, workers: int, prefix: str) -> None:
    """Raise ValueError naming the first bad option."""
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


def hook_name(image_hook: ImageHook | None) -> str | None:
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


def job_settings(input_path: Path, out_dir: Path, *, prefix: str, shard_size: int,
                 shard_bytes: int | None, max_size: int, resize_side: str, quality: int,
                 min_size: int, max_pixels: int, path_column: str, item_id_from: str,
                 balance_by: str | None, per_group: int | None, seed: int, shuffle: bool,
                 val_split: float | None, num_jobs: int, job_index: int, workers: int | None,
                 progress: bool, image_hook: ImageHook | None, start_method: str | None,
                 url_column: str | None = None,
                 fetch: FetchOptions | None = None) -> tuple[InputListing, JobSettings]:
    """Check every option, list the inputs and check OUT_DIR: the listing and the job's settings.

    The options are :func:`~loaders.convert.run.convert_to_shards`'s; so are the errors raised.
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    validate(shard_size, shard_bytes, per_group, balance_by, num_jobs, job_index, workers, prefix)
    methods = multiprocessing.get_all_start_methods()
    start_method = start_method or ("fork" if "fork" in methods else methods[0])
    if start_method not in methods:
        raise ValueError(f"start_method must be one of {methods} (got {start_method!r})")
    if item_id_from not in ITEM_ID_SOURCES:
        raise ValueError(f"item_id_from must be one of {ITEM_ID_SOURCES} (got {item_id_from!r})")
    options = HygieneOptions(max_size=max_size, resize_side=resize_side, quality=quality,
                             min_size=min_size, max_pixels=max_pixels)
    listing = read_inputs(input_path, path_column=path_column, item_id_from=item_id_from, url_column=url_column)
    if url_column is not None:
        fetch = fetch or FetchOptions(seed=seed)
        check_backends(item.path for item in listing.items)
    elif fetch is not None:
        raise ValueError("fetch options apply to a URL list: give url_column (--url-column) too")
    if balance_by is not None and balance_by not in listing.columns:
        where = "a folder input has no columns" if listing.kind == "folder" else \
            f"columns: {', '.join(listing.columns) or 'none'}"
        raise ValueError(f"balance_by column '{balance_by}' is not in {input_path} ({where})")
    check_out_dir(out_dir, input_path)
    recorded_options = {
        "prefix": prefix, "shard_size": shard_size, "shard_bytes": shard_bytes, "max_size": max_size,
        "resize_side": resize_side, "quality": quality, "min_size": min_size,
        "max_pixels": max_pixels, "path_column": path_column, "balance_by": balance_by,
        "per_group": per_group, "seed": seed, "shuffle": shuffle, "image_hook": hook_name(image_hook),
        **({"item_id_from": item_id_from} if item_id_from != "column" else {}),
        **({"val_split": val_split} if val_split is not None else {}),
        # the size cap decides what is written; the other fetch options only how fast (not in the fingerprint)
        **({"url_column": url_column, "max_bytes": fetch.max_bytes, "fetch": fetch.recorded()} if fetch else {}),
    }
    settings = JobSettings(
        options=options, image_hook=image_hook, shard_size=shard_size, shard_bytes=shard_bytes,
        group_columns=[balance_by] if balance_by else [c for c in ("region",) if c in listing.columns],
        workers=workers, progress=progress, start_method=start_method, num_jobs=num_jobs,
        job_index=job_index, recorded_options=recorded_options, fetch=fetch,
        fingerprint={**{k: v for k, v in recorded_options.items() if k != "fetch"},
                     "input": str(input_path.resolve()), "num_jobs": num_jobs, "job_index": job_index})
    return listing, settings
