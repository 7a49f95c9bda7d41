"""The PyTorch backend: a WebDataset tar stream decoded with Pillow in DataLoader workers.

Each worker reads its share of the rank's segments (see :mod:`loaders.sharding`), shuffles
them through a buffer, decodes every JPEG once at the smallest DCT scale (``Image.draft``)
that keeps every crop at least ``crop_size`` pixels, cuts ``views`` random resized crops
(:mod:`loaders.views`) and hands over chunks of ``batch_size`` samples. The main process
re-cuts the chunks into batches and copies them to the device (pinned memory, non-blocking).
Randomness: the shuffle buffer uses ``worker_info.seed`` (from a generator seeded by
seed/epoch/rank) and each sample's crops use a generator seeded by its position in the
worker's stream, so a resumed epoch draws the same crops without decoding the skipped samples.

Shards are opened by :func:`loaders.remote.open_shard` (local regular files, ``s3://``/``gs://``
streamed through fsspec, a ``pipe:`` the user typed). A shard that breaks part-way (zero
bytes, truncated, not a tar, shorter than its count) has the rest of its segment skipped and
counted in ``corrupt_count`` (train: stand-ins keep ``len(loader)`` batches), or, with
``corrupt="raise"``, one ValueError naming the shard. A sample whose image or ``.json`` cannot be
used (:func:`loaders.shard_reader.parse_meta`) or whose key repeats right after itself (the first
copy is read) is skipped and counted the same way, with its reason in ``loader.corrupt``, as the
DALI backend does. This loader streams the tar and uses no offsets, so a local shard's ``.idx``
need only give a right count: it was spot-checked against the tar when the shard set was loaded,
and fully checked where they disagree (:func:`loaders.shard_check.index_count`).
"""

from __future__ import annotations

import itertools
import logging
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from loaders.batch import Batch
from loaders.options import LoaderOptions
from loaders.crops import intra_op_threads
from loaders.remote import WEBDATASET_SCHEMES, check_readable, url_scheme
from loaders.shard_reader import (REPEATED, SHARD_ERRORS, SampleProblem, first_line, parse_meta, repeated_reason,
                                  shard_samples, shuffle_samples)
from loaders.sharding import (FOREVER, EpochPlan, Segment, check_start_batch, derive_seed, epoch_plan,
                              split_for_workers)
from loaders.views import centre_box, decode_views, random_resized_box

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
MISSING = "__missing__"  # a placeholder for a position a broken shard could not fill


def _image_bytes(sample: dict[str, Any]) -> bytes | None:
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return sample[extension]
    return None


class ShardStream(IterableDataset):
    """One rank's samples of one epoch, cut into chunks; each DataLoader worker takes a share."""

    def __init__(self, urls: Sequence[str], worker_segments: list[list[Segment]],
                 worker_skips: list[int], options: LoaderOptions, *, base_seed: int,
                 repeat: bool) -> None:
        self.urls = list(urls)
        self.counts = [shard.count for shard in options.shard_set.shards]
        self.worker_segments = worker_segments
        self.worker_skips = worker_skips
        self.options = options
        self.base_seed = base_seed
        self.repeat = repeat

    def _records(self, segments: list[Segment]) -> Iterator[tuple[str, dict[str, Any]]]:
        """This worker's samples of ``segments``, in order.

        A shard that cannot be read to the end of its segment (zero bytes, truncated, not a
        tar, or shorter than its count) stands for its missing positions with placeholders
        that :meth:`_decode` rejects, so they are skipped and counted like corrupt samples
        and the epoch keeps the length it promised (``corrupt="raise"``: a ValueError naming
        the shard). A shard longer than its count is read up to the count, with a warning.
        """
        for segment in segments:
            url = self.urls[segment.shard]
            read, problem = 0, None
            samples = shard_samples(url)
            try:
                for index, sample in enumerate(samples):
                    if index >= segment.stop:
                        if segment.stop == self.counts[segment.shard]:
                            logger.warning("shard %s holds more samples than its count %d; the rest are "
                                           "not read (rewrite its manifest entry and index)", url, segment.stop)
                        break
                    read = index + 1
                    if index >= segment.start:
                        yield url, sample
            except SHARD_ERRORS as error:
                problem = f"unreadable after {read} samples ({type(error).__name__}: {first_line(error)})"
            finally:
                samples.close()
            if problem is None and segment.stop != FOREVER and read < segment.stop:
                problem = f"short: it ends after {read} samples, its count says {self.counts[segment.shard]}"
            if problem is None:
                continue
            if self.options.corrupt == "raise":
                raise ValueError(f"shard {url} is {problem}")
            logger.warning("shard %s is %s; the rest of it is skipped and counted as corrupt", url, problem)
            # the positions this segment still owed (unknown count: one, for the count)
            missing = range(max(read, segment.start), segment.stop) if segment.stop != FOREVER else range(1)
            for index in missing:
                yield url, {"__key__": f"{Path(url).name}#{index}", MISSING: f"the shard is {problem}"}

    def _boxes(self, position_seed: int) -> Any:
        options = self.options
        if options.mode == "eval":
            return lambda width, height: [centre_box(width, height)]
        rng = random.Random(position_seed)
        return lambda width, height: [random_resized_box(rng, width, height, options.scale, options.ratio)
                                      for _ in range(options.views)]

    def _decode(self, url: str, sample: dict[str, Any], position_seed: int
                ) -> tuple[list[np.ndarray], dict[str, Any]]:
        key = sample["__key__"]
        if MISSING in sample:
            raise SampleProblem(sample[MISSING])
        data = _image_bytes(sample)
        if data is None:
            raise SampleProblem(f"no image member (.{'/.'.join(IMAGE_EXTENSIONS)})")
        meta = parse_meta(sample.get("json"), key)
        with intra_op_threads(1):  # a no-op in DataLoader workers, which run one thread already
            return decode_views(data, self.options.crop_size, self._boxes(position_seed)), meta

    def _laps(self, segments: list[Segment], rng: random.Random) -> Iterator[tuple[str, dict[str, Any]]]:
        # one lap over the segments; remote shards of unknown length are read lap after lap, each
        # lap shuffled on its own so a lap holds every sample once -- until a lap reads nothing
        for _ in itertools.count() if self.repeat else range(1):
            readable = 0
            buffer = self.options.shuffle_buffer if self.options.shuffle else 0
            for record in shuffle_samples(self._records(segments), buffer, rng):
                readable += MISSING not in record[1]
                yield record
            if self.repeat and not readable:
                logger.warning("no readable sample in %d shard(s) of this worker; its share of the "
                               "epoch ends here", len(segments))
                return

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._chunks()
        except ValueError as error:
            if get_worker_info() is None:
                raise
            # A worker's exception reaches the main process re-wrapped ("Caught ValueError in
            # DataLoader worker process 0" on the first line); hand the message over instead.
            yield {"error": str(error)}

    def _chunks(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        seed = info.seed if info is not None else self.base_seed
        options = self.options
        chunk_size = options.batch_size
        skip = self.worker_skips[worker]
        records = self._laps(self.worker_segments[worker], random.Random(seed))

        chunk: list[tuple[list[np.ndarray], str, dict[str, Any]]] = []
        corrupt: list[tuple[str, str, str]] = []  # (shard, key, reason) of each sample skipped
        resolved = 0  # positions handled (emitted, skipped for resume, or dropped), in order
        pending: list[int] = []  # corrupt positions still waiting for a stand-in (train mode)
        last_good: tuple[str, dict[str, Any]] | None = None

        def resolve(item: tuple[list[np.ndarray], str, dict[str, Any]] | None) -> dict[str, Any] | None:
            nonlocal chunk, corrupt, resolved
            if item is not None:
                chunk.append(item)
            resolved += 1
            if resolved % chunk_size == 0:
                out = self._pack(chunk, corrupt)
                chunk, corrupt = [], []
                return out
            return None

        for position, (url, sample) in enumerate(records):
            position_seed = (seed << 32) + position
            if position < skip:  # resume: keep the position (and its crops' seed), skip the decode
                if MISSING not in sample:
                    last_good = (url, sample)
                out = resolve(None)
                if out is not None:
                    yield out
                continue
            if REPEATED in sample:  # the first copy is read; the repeat is skipped and counted
                corrupt.append(self._skipped(url, sample["__key__"], repeated_reason(sample[REPEATED])))
            try:
                views, meta = self._decode(url, sample, position_seed)
            except DECODE_ERRORS + (KeyError,) as error:
                reason = str(error) if isinstance(error, SampleProblem) else f"{type(error).__name__}: {error}"
                corrupt.append(self._skipped(url, sample.get("__key__", "?"), reason, quiet=MISSING in sample))
                if options.mode == "eval":  # eval: every good sample once, no stand-ins
                    out = resolve(None)
                elif last_good is not None:  # stand-in: the previous good sample, fresh crops
                    out = resolve(self._stand_in(last_good, position_seed))
                else:
                    pending.append(position_seed)
                    continue
                if out is not None:
                    yield out
                continue
            for waiting_seed in pending:  # stand-ins for corrupt samples before the first good one
                out = resolve(self._stand_in((url, sample), waiting_seed))
                if out is not None:
                    yield out
            pending = []
            last_good = (url, sample)
            out = resolve((views, sample["__key__"], meta))
            if out is not None:
                yield out
        if pending:
            logger.warning("worker %d: %d corrupt sample(s) and no good one to stand in", worker, len(pending))
        if chunk or corrupt or resolved % chunk_size:
            yield self._pack(chunk, corrupt)

    def _skipped(self, url: str, key: str, reason: str, *, quiet: bool = False) -> tuple[str, str, str]:
        """A sample left out: raise (``corrupt="raise"``) or warn and return its record. ``quiet``:
        a position a broken shard could not fill (its shard was named once already)."""
        if self.options.corrupt == "raise":
            raise ValueError(f"corrupt sample {key!r} in shard {url}: {reason}")
        if not quiet:
            logger.warning("skipping corrupt sample %r in shard %s: %s", key, url, reason)
        return url, key, reason

    def _stand_in(self, record: tuple[str, dict[str, Any]], position_seed: int
                  ) -> tuple[list[np.ndarray], str, dict[str, Any]]:
        views, meta = self._decode(record[0], record[1], position_seed)
        return views, record[1]["__key__"], meta

    def _pack(self, chunk: list[tuple[list[np.ndarray], str, dict[str, Any]]],
              corrupt: list[tuple[str, str, str]]) -> dict[str, Any]:
        views = []
        if chunk:
            for view in range(len(chunk[0][0])):
                stacked = np.stack([item[0][view] for item in chunk])  # N x S x S x 3
                views.append(torch.from_numpy(stacked).permute(0, 3, 1, 2))  # N x 3 x S x S, channels_last
        return {"views": views, "keys": [item[1] for item in chunk],
                "meta": [item[2] for item in chunk], "corrupt": corrupt}


def _worker_skips(worker_totals: Sequence[int | None], chunk_size: int, skip_samples: int) -> list[int]:
    """How many leading stream positions each worker skips so the merged stream starts at
    ``skip_samples`` (workers hand over chunks round robin; ``None`` means endless)."""
    skips = [0] * len(worker_totals)
    remaining = [FOREVER if total is None else total for total in worker_totals]
    while skip_samples > 0 and any(remaining):
        for worker in range(len(worker_totals)):
            if skip_samples <= 0:
                break
            if remaining[worker] <= 0:
                continue
            size = min(chunk_size, remaining[worker])
            taken = min(size, skip_samples)
            skips[worker] += taken
            remaining[worker] -= size
            skip_samples -= taken
    return skips


class TorchLoader:
    """One rank's epoch through PyTorch DataLoader workers (see :func:`loaders.build_loader`)."""

    backend = "torch"

    def __init__(self, options: LoaderOptions) -> None:
        self.options = options
        shards = options.shard_set.shards
        self.urls = [shard.url for shard in shards]
        self.corrupt: list[tuple[str, str, str]] = []
        self.plan: EpochPlan = epoch_plan(
            options.shard_set, batch_size=options.batch_size, seed=options.seed, epoch=options.epoch,
            rank=options.rank, world_size=options.world_size, drop_last=options.drop_last,
            mode=options.mode, epoch_samples=options.epoch_samples)
        self.repeat = any(shard.count is None for shard in shards)
        check_start_batch(options.start_batch, self.plan.num_batches)
        self.num_workers = min(options.num_workers, len(self.plan.segments))
        for scheme in {url_scheme(url) for url in self.urls} - {None, *WEBDATASET_SCHEMES}:
            # here, not in a worker: a missing s3fs/gcsfs, bad credentials or a wrong endpoint
            # is one error naming the URL (the extra to install, the store's refusal)
            check_readable(next(url for url in self.urls if url_scheme(url) == scheme))

    def __len__(self) -> int:
        return self.plan.num_batches - self.options.start_batch

    @property
    def corrupt_count(self) -> int:
        """Corrupt samples met so far (skipped, and in training replaced by a stand-in); their
        ``(shard, key, reason)`` are in ``loader.corrupt``."""
        return len(self.corrupt)

    def _dataset(self) -> tuple[ShardStream, torch.Generator, int]:
        options = self.options
        workers = max(1, self.num_workers)
        worker_segments = split_for_workers(self.plan.segments, workers)
        totals = [None if self.repeat else sum(s.count for s in part) for part in worker_segments]
        skips = _worker_skips(totals, options.batch_size, options.start_batch * options.batch_size)
        base_seed = derive_seed(options.seed, options.epoch, options.rank, "torch-loader")
        generator = torch.Generator().manual_seed(base_seed)
        dataset = ShardStream(self.urls, worker_segments, skips, options, base_seed=base_seed,
                              repeat=self.repeat)
        return dataset, generator, base_seed

    def __iter__(self) -> Iterator[Batch]:
        options = self.options
        device = options.device
        wanted = len(self)
        if wanted <= 0:
            return
        dataset, generator, _ = self._dataset()
        on_cuda = device.type == "cuda"
        chunks = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=on_cuda, generator=generator,
                            prefetch_factor=4 if self.num_workers else None)
        pending_views: list[list[torch.Tensor]] = []
        pending_keys: list[str] = []
        pending_meta: list[dict[str, Any]] = []
        yielded = 0
        size = options.batch_size
        for chunk in chunks:
            if "error" in chunk:
                raise ValueError(chunk["error"])
            self.corrupt += [(str(url), str(key), str(reason)) for url, key, reason in chunk["corrupt"]]
            if not chunk["keys"]:
                continue
            pending_views.append([view.to(device, non_blocking=True) for view in chunk["views"]])
            pending_keys += chunk["keys"]
            pending_meta += chunk["meta"]
            while len(pending_keys) >= size and yielded < wanted:
                yield self._cut(pending_views, pending_keys, pending_meta, size)
                yielded += 1
            if yielded >= wanted:
                return
        if pending_keys and not options.drop_last and yielded < wanted:
            yield self._cut(pending_views, pending_keys, pending_meta, len(pending_keys))

    @staticmethod
    def _cut(pending_views: list[list[torch.Tensor]], pending_keys: list[str],
             pending_meta: list[dict[str, Any]], size: int) -> Batch:
        """Take the first ``size`` samples off the pending pieces (in place)."""
        views_per_piece = list(zip(*pending_views))  # per view: the pieces, N_i x 3 x S x S
        joined = [torch.cat(pieces) if len(pieces) > 1 else pieces[0] for pieces in views_per_piece]
        batch = Batch(views=[view[:size] for view in joined], keys=pending_keys[:size],
                      meta=pending_meta[:size])
        rest = [view[size:] for view in joined]
        pending_views.clear()
        if rest and rest[0].shape[0]:
            pending_views.append(rest)
        del pending_keys[:size]
        del pending_meta[:size]
        return batch
