"""The DALI backend: ``fn.readers.webdataset`` -> decode (``mixed`` on GPU) -> random resized crops.

The processing graph is :func:`views_graph`, a plain function; :func:`shard_pipeline` only wires
the named reader to it. DALI splits the sample list over ranks with ``shard_id``/``num_shards``
(the same contiguous split as :mod:`loaders.sharding`); its ``random_shuffle`` is only a local
buffer, so the shard order of each epoch is ours: the pipeline is built per epoch with the
shards listed in that epoch's order.

Corrupt JPEGs: a DALI decoder that meets one fails the whole batch and offers no per-sample
skip (NVIDIA/DALI#3913), so local shards are checked before the pipeline is built
(:mod:`loaders.shard_check`, remembered on disk between runs): the ``.idx`` against the tar (a
wrong one is refused), every JPEG and every ``.json`` (read as the PyTorch backend reads it). Corrupt
samples, and the repeat of a key written twice in a row, are left out of a filtered copy of the
shard's index (``corrupt="skip"``, counted in ``corrupt_count``, reasons in ``corrupt``) or raise
with the shard and key (``corrupt="raise"``). A sample without a ``.json`` is read with
``{"key": key}``, as by the PyTorch backend. A decode error the check could not foresee still
stops the epoch with a RuntimeError that names what DALI names (shard, offset and key).

Graph variants (``variant=``), measured by ``bench/loaders.py``:

* ``decode_once``: one full decode, then ``random_resized_crop`` per view, all in DALI;
* ``crop_decode``: ``decoders.image_random_crop`` (ROI decode) + ``resize`` per view;
* ``torch_crops`` (CPU only): DALI reads, decodes and draws the crop windows
  (``random_crop_generator``); the crops are resized by torch's uint8 antialiased bilinear
  kernel, reading DALI's output buffers without a copy. DALI's CPU resampling is generic code
  ("DALI's CPU implementation isn't optimized very much", NVIDIA/DALI#4581): on 2 cores two
  224-px crops cost ~1.4 ms of thread time each, torch's SIMD kernel ~0.3 ms, so this variant
  is the CPU default. On the GPU DALI's own resize is fast and ``decode_once`` is the default.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from loaders.batch import Batch
from loaders.options import LoaderOptions
from loaders.dali_index import member_key, parse_line, split_inside, write_index
from loaders.crops import intra_op_threads, resize_crop
from loaders.shard_check import check_shard
from loaders.shard_reader import parse_meta
from loaders.sharding import check_start_batch, derive_seed, plan_epoch

logger = logging.getLogger(__name__)

READER_NAME = "Reader"
DECODE_VARIANTS = ("decode_once", "crop_decode", "torch_crops")
# Chosen by bench/loaders.py (2 cores, 512-px JPEGs, batch 64, two 224-px views): on CPU
# torch_crops ~2x decode_once, and decode_once beats crop_decode (two ROI decodes + resizes).
DEFAULT_VARIANT = {"cpu": "torch_crops", "gpu": "decode_once"}
CPU_ONLY_VARIANTS = ("torch_crops",)
HW_DECODER_LOAD = 0.65  # share of images for the A100/H100 hardware JPEG decoder; nvJPEG CUDA does the rest

def variants_for(on_gpu: bool) -> tuple[str, ...]:
    """The decode variants a pipeline on the GPU (``mixed`` decode) or on the CPU can run."""
    return tuple(v for v in DECODE_VARIANTS if not (on_gpu and v in CPU_ONLY_VARIANTS))


def views_graph(jpegs: Any, *, on_gpu: bool, views: int, crop_size: int, scale: Sequence[float],
                ratio: Sequence[float], mode: str, variant: str) -> list[Any]:
    """The processing graph: encoded JPEGs -> ``views`` uint8 CHW crops (DALI DataNodes).

    Train: random resized crops (``scale`` = area range, ``ratio`` = aspect range); eval:
    resize the shorter side to ``crop_size`` and cut the centre square. The ``torch_crops``
    variant (train) returns the decoded HWC image and ``views`` (anchor, shape) pairs instead.
    """
    from nvidia.dali import fn, types

    decode = {"device": "mixed", "hw_decoder_load": HW_DECODER_LOAD} if on_gpu else {"device": "cpu"}
    size = (crop_size, crop_size)
    if mode == "eval":
        images = fn.decoders.image(jpegs, output_type=types.RGB, **decode)
        images = fn.resize(images, resize_shorter=crop_size, antialias=True)
        crops = [fn.crop(images, crop=size)]
    elif variant == "decode_once":
        images = fn.decoders.image(jpegs, output_type=types.RGB, **decode)
        # a triangular filter antialiases like the default linear one, measured ~10-20% faster on CPU
        crops = [fn.random_resized_crop(images, size=size, random_area=list(scale),
                                        random_aspect_ratio=list(ratio),
                                        interp_type=types.INTERP_TRIANGULAR) for _ in range(views)]
    elif variant == "torch_crops":
        # the full image and, per view, the crop window (anchor and shape, both (y, x)) that
        # :func:`resize_crops` cuts and resizes
        images = fn.decoders.image(jpegs, output_type=types.RGB, **decode)
        outputs = [images]
        for _ in range(views):
            outputs += fn.random_crop_generator(images.shape(), random_area=list(scale),
                                                random_aspect_ratio=list(ratio))
        return outputs
    elif variant == "crop_decode":
        # each view decodes only its region of interest (libjpeg-turbo / nvJPEG ROI decode)
        crops = [fn.resize(fn.decoders.image_random_crop(jpegs, output_type=types.RGB,
                                                         random_area=list(scale),
                                                         random_aspect_ratio=list(ratio), **decode),
                           size=size, interp_type=types.INTERP_TRIANGULAR) for _ in range(views)]
    else:
        raise ValueError(f"DALI decode variant must be one of {DECODE_VARIANTS}, got {variant!r}")
    return [fn.transpose(crop, perm=[2, 0, 1]) for crop in crops]  # HWC -> CHW


def shard_pipeline(*, paths: list[str], index_paths: list[str], shard_id: int, num_shards: int,
                   shuffle_buffer: int, graph_options: dict[str, Any], batch_size: int,
                   num_threads: int, device_id: int | None, seed: int) -> Any:
    """Build the DALI pipeline: the named webdataset reader wired to :func:`views_graph`."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def
    def pipeline():
        jpegs, metadata = fn.readers.webdataset(
            paths=paths, index_paths=index_paths, ext=["jpg;jpeg", "json"], name=READER_NAME,
            shard_id=shard_id, num_shards=num_shards, random_shuffle=shuffle_buffer > 1,
            initial_fill=max(shuffle_buffer, 1), missing_component_behavior="empty",  # no .json: {}
            prefetch_queue_depth=2)
        # "<tar>:<offset>:<key>.jpg", for shards whose json does not repeat the key
        source = fn.get_property(jpegs, key="source_info")
        # the iterator needs dense batches: pad the variable-length bytes with zeros
        return (*views_graph(jpegs, **graph_options), fn.pad(metadata, fill_value=0),
                fn.pad(source, fill_value=0))

    return pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=2)


class DaliLoader:
    """One rank's epoch through a DALI pipeline (see :func:`loaders.build_loader`)."""

    def __init__(self, options: LoaderOptions, *, variant: str | None = None,
                 on_gpu: bool | None = None) -> None:
        self.options = options
        # on_gpu: mixed decode on the device's GPU (None: where the device is); False on a CUDA
        # device runs the CPU graph and copies the views (backend "dali-cpu")
        self.on_gpu = options.device.type == "cuda" if on_gpu is None else on_gpu
        if self.on_gpu and options.device.type != "cuda":
            raise ValueError(f"DALI mixed decode needs a CUDA device, got {options.device}")
        self.backend = "dali-gpu" if self.on_gpu else "dali-cpu"
        self.variant = variant or DEFAULT_VARIANT["gpu" if self.on_gpu else "cpu"]
        if self.variant not in DECODE_VARIANTS:
            raise ValueError(f"DALI decode variant must be one of {DECODE_VARIANTS}, got {self.variant!r}")
        if self.variant not in variants_for(self.on_gpu):
            raise ValueError(f"DALI variant {self.variant!r} is for CPU pipelines; on the GPU use one of "
                             f"{variants_for(True)} (DALI's GPU resize is fast)")
        self._filtered = tempfile.TemporaryDirectory(prefix="ecomaug-dali-idx-")
        self.paths, self.index_paths, counts, self.corrupt = self._checked_shards()
        self.plan = plan_epoch(counts, batch_size=options.batch_size, seed=options.seed,
                               epoch=options.epoch, rank=options.rank,
                               world_size=options.world_size, drop_last=options.drop_last,
                               shuffle=options.shuffle)
        check_start_batch(options.start_batch, self.plan.num_batches)

    def _checked_shards(self) -> tuple[list[str], list[str], list[int], list[tuple[str, str, str]]]:
        shards = self.options.shard_set.shards
        for shard in shards:
            if not shard.is_local:
                raise ValueError(f"the DALI backend reads local files only, got {shard.url!r}; "
                                 f"use backend='torch' for URLs")
            if shard.index_path is None or not Path(shard.index_path).is_file():
                raise ValueError(f"{shard.url}: no DALI index beside it; write one with `python -m "
                                 f"loaders.dali_index {shard.url} {Path(shard.url).with_suffix('.idx')}`")
        # Each rank starts checking at its own share of the list, so on a first run the ranks
        # check different shards and find the rest already in the on-disk cache.
        start = self.options.rank * len(shards) // self.options.world_size
        rotated = list(range(start, len(shards))) + list(range(start))
        checks = {number: check_shard(shards[number].url, shards[number].index_path)
                  for number in tqdm(rotated, desc="checking shards", unit="shard", delay=2.0,
                                     disable=self.options.rank != 0, leave=False)}
        paths, index_paths, counts, corrupt = [], [], [], []
        for number, shard in enumerate(shards):
            kept_lines, bad = checks[number]
            kept, beyond = split_inside([parse_line(line) for line in kept_lines], os.path.getsize(shard.url))
            bad = [*bad, *((sample.key, "beyond the end of the shard (the tar is truncated)") for sample in beyond)]
            index_path = shard.index_path
            if bad:
                if self.options.corrupt == "raise":
                    key, reason = bad[0]
                    raise ValueError(f"corrupt sample {key!r} in shard {shard.url}: {reason}"
                                     + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
                for key, reason in bad:
                    logger.warning("skipping corrupt sample %r in shard %s: %s", key, shard.url, reason)
                corrupt += [(shard.url, key, reason) for key, reason in bad]
                index_path = os.path.join(self._filtered.name, f"{number:06d}.idx")
                write_index(index_path, [sample.line for sample in kept])
            if not kept:
                continue  # DALI refuses an empty shard; it contributes no sample anyway
            paths.append(shard.url)
            index_paths.append(index_path)
            counts.append(len(kept))
        if not counts:
            raise ValueError("no readable sample in the shard set")
        return paths, index_paths, counts, corrupt

    def __len__(self) -> int:
        return self.plan.num_batches - self.options.start_batch

    @property
    def corrupt_count(self) -> int:
        """Corrupt samples left out of this epoch (found when the loader was built); their
        ``(shard, key, reason)`` are in ``loader.corrupt``."""
        return len(self.corrupt)

    def _device_id(self) -> int | None:
        if not self.on_gpu:
            return None
        device = self.options.device
        return device.index if device.index is not None else torch.cuda.current_device()

    def build_pipeline(self) -> Any:
        """The DALI pipeline of this loader's epoch and rank, built."""
        options = self.options
        order = self.plan.shard_order
        pipeline = shard_pipeline(
            paths=[self.paths[i] for i in order], index_paths=[self.index_paths[i] for i in order],
            shard_id=options.rank, num_shards=options.world_size,
            shuffle_buffer=options.shuffle_buffer if options.shuffle else 0,
            graph_options={"on_gpu": self.on_gpu, "views": options.views, "crop_size": options.crop_size,
                           "scale": options.scale, "ratio": options.ratio, "mode": options.mode,
                           "variant": self.variant},
            batch_size=options.batch_size, num_threads=max(1, options.num_workers),
            device_id=self._device_id(),
            seed=derive_seed(options.seed, options.epoch, options.rank, "dali"))
        pipeline.build()
        return pipeline

    def __iter__(self) -> Iterator[Batch]:
        if len(self) <= 0:
            return
        if self.variant == "torch_crops" and self.options.mode == "train":
            yield from self._torch_crop_batches()
        else:
            yield from self._iterator_batches()

    def _torch_crop_batches(self) -> Iterator[Batch]:
        """Run the pipeline directly and resize its crop windows with torch (CPU only).

        The decoded images are read in place from DALI's output buffers (no copy, no padding to
        a common shape), which stay valid until the next ``run()``; the views are new tensors.
        DALI's reader fills a rank's last batch from the next epoch, so the plan trims it.
        """
        options = self.options
        try:
            pipeline = self.build_pipeline()
        except RuntimeError as error:
            raise self._named_error(error, 0) from error
        remaining = self.plan.num_samples
        for index in range(self.plan.num_batches):
            try:
                outputs = pipeline.run()
            except RuntimeError as error:
                raise self._named_error(error, index) from error
            count = min(options.batch_size, remaining)
            remaining -= count
            if index < options.start_batch:
                continue  # resume replays the skipped batches but need not resize their crops
            images = [torch.from_numpy(np.asarray(outputs[0][i])) for i in range(count)]
            windows = [(outputs[1 + 2 * v].as_array()[:count], outputs[2 + 2 * v].as_array()[:count])
                       for v in range(options.views)]
            views = resize_crops(images, windows, options.crop_size)
            del images  # views into DALI's buffers; the next run() may reuse them
            metas = [_parse_meta(np.asarray(outputs[-2][i]).tobytes(), np.asarray(outputs[-1][i]).tobytes())
                     for i in range(count)]
            yield Batch(views=[view.to(options.device) for view in views],
                        keys=[meta["key"] for meta in metas], meta=metas)

    def _iterator_batches(self) -> Iterator[Batch]:
        """Batches through DALI's PyTorch iterator (graph-only variants, GPU and eval)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        options = self.options
        names = [f"view{i}" for i in range(options.views)] + ["meta", "source"]
        policy = LastBatchPolicy.DROP if options.drop_last else LastBatchPolicy.PARTIAL
        index = 0
        try:  # the iterator runs the first batch as it is built
            batches = iter(DALIGenericIterator([self.build_pipeline()], names, reader_name=READER_NAME,
                                               last_batch_policy=policy, auto_reset=False))
        except RuntimeError as error:
            raise self._named_error(error, index) from error
        # Resume replays the skipped batches (same seed, same order, same crops) and drops them.
        for index in range(self.plan.num_batches):
            try:
                outputs = next(batches)[0]
            except StopIteration:
                return
            except RuntimeError as error:
                raise self._named_error(error, index) from error
            if index < options.start_batch:
                continue
            metas = [_parse_meta(bytes(row.cpu().numpy()), bytes(source.cpu().numpy()))
                     for row, source in zip(outputs["meta"], outputs["source"])]
            views = [outputs[name].to(options.device, non_blocking=True) for name in names[:-2]]
            yield Batch(views=views, keys=[meta["key"] for meta in metas], meta=metas)

    def _named_error(self, error: RuntimeError, index: int) -> RuntimeError:
        return RuntimeError(f"DALI failed in epoch {self.options.epoch}, batch {index} on rank "
                            f"{self.options.rank}{_named_source(str(error))}: {_first_line(error)}")


def resize_crops(images: Sequence[torch.Tensor], windows: Sequence[tuple[np.ndarray, np.ndarray]],
                 crop_size: int) -> list[torch.Tensor]:
    """Cut every view's window out of the images and resize it to ``crop_size`` (CPU).

    Args:
        images: ``N`` uint8 HWC images (any sizes).
        windows: per view, the ``(N, 2)`` anchors and ``(N, 2)`` shapes of the crops, ``(y, x)``
            and ``(h, w)``, as ``fn.random_crop_generator`` gives them.
        crop_size: side ``S`` of the square views.

    Returns:
        One :math:`(N, 3, S, S)` uint8 tensor per view, channels_last in memory (the layout
        :func:`loaders.crops.resize_crop` writes: no transposing copy per crop).
    """
    views = []
    with intra_op_threads(1):
        for anchors, shapes in windows:
            out = torch.empty((len(images), 3, crop_size, crop_size), dtype=torch.uint8,
                              memory_format=torch.channels_last)
            for i, (image, (top, left), (height, width)) in enumerate(zip(images, anchors.tolist(),
                                                                          shapes.tolist())):
                out[i] = resize_crop(image, top, left, height, width, crop_size)
            views.append(out)
    return views


def _parse_meta(row: bytes, source: bytes) -> dict[str, Any]:
    # the iterator pads the variable-length bytes of a batch with zeros; a sample without a .json
    # (its output empty) is all padding. The shard check left out every .json parse_meta refuses.
    member = source.rstrip(b"\0").decode("utf-8", "replace").rsplit(":", 1)[-1]
    return parse_meta(row.rstrip(b"\0") or None, member_key(member))


def _named_source(message: str) -> str:
    match = re.search(r"([^\s:]+\.tar):(\d+):([^\s.]+)\.", message)
    return f" (shard {match.group(1)}, key {match.group(3)!r})" if match else ""


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    interesting = [line for line in lines if "decode" in line.lower() or "failure" in line.lower()]
    return (interesting or lines or [type(error).__name__])[0]
