"""Images to embeddings with a trained backbone: in memory, or streamed into a resumable parts folder.

Images are cut and resized exactly as the loaders' eval mode does (:func:`prepare`: the centre
square, antialiased bilinear, the export's ``interpolation``), normalised with the model's
mean/std and embedded in batches on the given device (:func:`embed_samples`, :func:`embed_data`),
or streamed by :func:`embed_to_parts` into a folder of parts (resumable, split by rank).

The model (:mod:`ecomaug.evaluation.models`), the sources of images
(:mod:`ecomaug.evaluation.sources`) and the embeddings on disk (:mod:`ecomaug.evaluation.embeddings`)
each have their own module; their public names are re-exported here, where callers import them.
"""

from __future__ import annotations

import os
from itertools import islice
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image

from ecomaug.evaluation.embeddings import (DONE_PATTERN, PART_PATTERN, Embeddings, PartsReport,
                                           RankParts, is_parts_folder, load_embeddings)
from ecomaug.evaluation.models import (EmbeddingModel, load_checkpoint, load_export, load_model,
                                       random_init_model, resolve_device)
from ecomaug.evaluation.sources import (ReadReport, Sample, count_samples, data_location,
                                        error_reason, is_shards, iter_data, iter_folder_samples,
                                        iter_manifest_samples, iter_shard_samples, read_counts,
                                        shortfall)
from loaders.atomic import DiskFullError  # raised by Embeddings.save
from loaders.convert.hygiene import read_image
from loaders.torch_backend import DECODE_ERRORS  # what a broken image raises, as the loaders catch it

__all__ = ["DONE_PATTERN", "PART_PATTERN", "DiskFullError", "EmbeddingModel", "Embeddings",
           "PartsReport", "RankParts", "ReadReport", "Sample", "count_samples", "decodable_samples",
           "embed_data",
           "embed_samples", "embed_to_parts", "embed_with_loader", "is_parts_folder", "iter_data",
           "iter_folder_samples", "iter_manifest_samples", "iter_shard_samples", "load_checkpoint",
           "load_embeddings", "load_export", "load_model", "prepare", "random_init_model",
           "read_counts", "resolve_device", "shortfall"]


def prepare(image: Image.Image | bytes, size: int) -> torch.Tensor:
    """Decode if needed, then the loaders' eval crop: the centre square, resized to ``size``.

    The same preprocessing as ``build_loader(mode="eval")`` (the centred square that "shorter
    side to ``size``, centre crop" keeps, resized with torch's antialiased bilinear kernel,
    :func:`loaders.crops.resize_crop`) and as the export's ``interpolation`` says.

    Shape:
        - output: :math:`(3, size, size)` uint8.
    """
    from loaders.crops import resize_crop
    from loaders.views import centre_box

    if isinstance(image, (bytes, bytearray)):
        image = read_image(bytes(image))  # as the shard conversion reads: EXIF, alpha on white
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())  # H x W x 3
    height, width = pixels.shape[:2]
    left, top, side, _ = centre_box(width, height)
    x0, y0 = round(left), round(top)  # rounded as the loaders round their windows
    x1, y1 = max(round(left + side), x0 + 1), max(round(top + side), y0 + 1)
    return resize_crop(pixels, y0, x0, y1 - y0, x1 - x0, size).contiguous()  # 3 x S x S


class _Batches:
    """Crops gathered into batches of ``batch_size``, each embedded as it fills (results on CPU)."""

    def __init__(self, model: EmbeddingModel, batch_size: int, dim: int = 0) -> None:
        self.model, self.batch_size, self.dim = model, batch_size, dim
        self.chunks: list[torch.Tensor] = []
        self.pending: list[torch.Tensor] = []

    def add(self, crop: torch.Tensor) -> int:
        """Queue one ``3 x S x S`` crop; returns how many crops this embedded (0 or a batch)."""
        self.pending.append(crop)
        return self.flush() if len(self.pending) == self.batch_size else 0

    def flush(self) -> int:
        """Embed what is queued; returns how many crops that was."""
        count = len(self.pending)
        if count:
            self.chunks.append(self.model.embed(torch.stack(self.pending)).cpu())
            self.dim, self.pending = self.chunks[-1].shape[1], []
        return count

    def vectors(self) -> torch.Tensor:
        """Every crop's embedding in order (``0 x dim`` when there were none)."""
        self.flush()
        return torch.cat(self.chunks) if self.chunks else torch.zeros((0, self.dim))


def _decode_skip(key: str, row: dict[str, Any], position: int, error: BaseException) -> dict[str, Any]:
    """The skip record of an image that does not decode: its file (or key), key and reason."""
    return {"where": row.get("source", key), "key": key, "position": position,
            "reason": f"cannot decode ({error_reason(error)})"}


def decodable_samples(samples: Iterable[Sample], report: ReadReport | None) -> list[Sample]:
    """The samples whose image decodes (as :func:`prepare` reads it), in order.

    Each other one is recorded in ``report`` with its file, key and reason, and taken off
    ``report.yielded`` (it was read, not used); without a report it raises ValueError naming it.
    """
    kept: list[Sample] = []
    for position, (key, row, image) in enumerate(samples):
        try:
            if isinstance(image, (bytes, bytearray)):  # a PIL image or a callable is decoded already
                read_image(bytes(image), min_side=1)  # a JPEG at 1/8 scale: the whole stream, ~8x cheaper
        except DECODE_ERRORS as error:
            record = _decode_skip(key, row, position, error)
            if report is None:
                raise ValueError(f"{record['where']}: key {key}: {record['reason']}") from error
            report.skipped.append(record)
            report.yielded -= 1
            continue
        kept.append((key, row, image))
    return kept


def embed_samples(model: EmbeddingModel, samples: Iterable[Sample], *, batch_size: int = 64,
                  total: int | None = None, progress: bool = True, description: str = "embed",
                  report: ReadReport | None = None) -> Embeddings:
    """Embed ``(key, meta, image)`` samples in batches on the model's device.

    Args:
        model: the backbone and its preprocessing.
        samples: ``image`` is encoded bytes, a PIL image, or a zero-argument callable returning
            either (so disturbed queries are made only when their batch is embedded).
        batch_size: images per forward pass.
        total: number of samples, for the progress bar.
        progress: show a tqdm bar.
        description: the bar's label.
        report: where an image that does not decode is recorded (with its key, file and
            reason) and skipped; without it, it raises.

    Raises:
        ValueError: an image does not decode (naming its key; only when ``report`` is None),
            or there is nothing to embed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    from tqdm.auto import tqdm

    keys: list[str] = []
    meta: list[dict[str, Any]] = []
    batches = _Batches(model, batch_size)
    bar = tqdm(total=total, desc=description, unit="img", disable=not progress)
    for position, (key, row, image) in enumerate(samples):
        try:
            crop = prepare(image() if callable(image) else image, model.input_size)
        except DECODE_ERRORS as error:
            record = _decode_skip(key, row, position, error)
            if report is None:
                raise ValueError(f"{record['where']}: key {key}: {record['reason']}") from error
            report.skipped.append(record)
            continue
        keys.append(key)
        meta.append(row)
        bar.update(batches.add(crop))
    bar.update(batches.flush())
    bar.close()
    if not keys:
        raise ValueError(_nothing_embedded("no images to embed", report.skipped if report else []))
    return Embeddings(vectors=batches.vectors(), keys=keys, meta=meta, info=model.info())


def embed_with_loader(model: EmbeddingModel, shards: str | os.PathLike, *, batch_size: int = 64,
                      backend: str = "auto", progress: bool = True) -> Embeddings:
    """Embed shards through ``loaders.build_loader(mode="eval")`` (DALI decodes on the GPU).

    The loader yields every sample once, resized and centre-cropped to the model's input size.
    """
    from tqdm.auto import tqdm

    from loaders.build import build_loader

    loader = build_loader(shards, backend=backend, device=model.device, batch_size=batch_size,
                          views=1, crop_size=model.input_size, mode="eval")
    keys: list[str] = []
    meta: list[dict[str, Any]] = []
    chunks: list[torch.Tensor] = []
    for batch in tqdm(loader, total=len(loader), desc=f"embed ({loader.backend})", unit="batch",
                      disable=not progress):
        chunks.append(model.embed(batch.views[0]).cpu())
        keys.extend(batch.keys)
        meta.extend(batch.meta or [{"key": key} for key in batch.keys])
    if not chunks:
        raise ValueError(f"{shards}: no samples to embed")
    info = {**model.info(), "loader": loader.backend}
    return Embeddings(vectors=torch.cat(chunks), keys=keys, meta=meta, info=info)


def embed_data(model: EmbeddingModel, data: str | os.PathLike, *, batch_size: int = 64,
               loader: str = "builtin", progress: bool = True,
               report: ReadReport | None = None) -> Embeddings:
    """Embed every image of shards, an ``items.csv`` or a plain folder, in order.

    Args:
        model: see :func:`load_model` / :func:`random_init_model`.
        data: a shard directory / manifest / tar / brace pattern / URL, an ``items.csv``, or a
            folder of images (keys are then the relative paths).
        batch_size: images per forward pass.
        loader: for shards: ``"builtin"`` (decode with PIL here, the same path ``ecomaug eval``
            uses for gallery and queries) or a ``build_loader`` backend (``"auto"``, ``"dali"``,
            ``"torch"``) for fast decoding on the device.
        progress: show a tqdm bar.
        report: (builtin) record what was not embedded and go on: unreadable shards and files,
            samples a shard's count promises but it does not hold, images that do not decode
            (see :class:`ReadReport`); ``info["read"]`` then holds :func:`read_counts`. Without
            it, the first of these raises ValueError naming the shard, file or key.
    """
    if loader != "builtin":
        if not is_shards(data):
            raise ValueError(f"loader={loader!r} reads shards only; {data} is a folder or csv "
                             "(use loader='builtin')")
        return embed_with_loader(model, data, batch_size=batch_size, backend=loader,
                                 progress=progress)
    total = count_samples(data)
    embeddings = embed_samples(model, iter_data(data, report=report), batch_size=batch_size,
                               progress=progress, total=total, description="embed", report=report)
    embeddings.info["data"] = data_location(data)  # where the images are, for thumbnails later
    if report is not None:
        embeddings.info["read"] = read_counts(len(embeddings.keys), report.skipped, total)
    return embeddings


def embed_to_parts(model: EmbeddingModel, data: str | os.PathLike, out_dir: str | os.PathLike, *,
                   batch_size: int = 64, part_size: int = 4096, rank: int = 0,
                   world_size: int = 1, progress: bool = True) -> PartsReport:
    """Embed ``data`` into a folder of parts, written as they are computed and resumable.

    Memory stays at one part whatever the data's size. Rank ``r`` of ``world_size`` embeds the
    contiguous share ``[N*r // W, N*(r+1) // W)`` of the samples (the loaders' rank split,
    :func:`loaders.sharding.rank_range`) and writes ``part-r<rank>-<n>.npz`` (each covers
    ``part_size`` consecutive samples of its share, written atomically), then
    ``done-r<rank>-of-<W>.json``. Rerunning the same command after a kill keeps the finished
    parts and embeds the rest; :func:`load_embeddings` reads the folder as one set once every
    rank is done. Samples before a rank's share (or a resumed run's finished parts) are read
    but not decoded.

    Args:
        model: the backbone (on this rank's device).
        data: shards, a CSV/JSONL manifest or an image folder (see :func:`iter_data`).
        out_dir: the parts folder (created).
        batch_size: images per forward pass.
        part_size: samples per part.
        rank: this process's rank.
        world_size: how many processes share the data (needs a known sample count when > 1).
        progress: show a tqdm bar.

    Returns:
        A :class:`PartsReport`.

    Raises:
        ValueError: bad sizes or rank, an unknown sample count with several ranks, a folder
            holding parts of another model, data or split, or nothing to embed.
        DiskFullError: the disk filled up (no partial file is left).
    """
    from tqdm.auto import tqdm

    from loaders.sharding import check_rank, rank_range

    check_rank(rank, world_size)
    if batch_size < 1 or part_size < 1:
        raise ValueError(f"batch_size and part_size must be >= 1; got {batch_size}, {part_size}")
    total = count_samples(data)
    if total is None and world_size > 1:
        raise ValueError(f"{data}: the number of samples is unknown (shards without a manifest or "
                         ".idx), so it cannot be split across {world_size} ranks")
    start, stop = rank_range(total, rank, world_size) if total is not None else (0, None)
    parts = RankParts(out_dir, rank=rank, world_size=world_size,
                      settings={**model.info(), "data": data_location(data), "world_size": world_size,
                                "part_size": part_size, "stream_total": total})
    report = ReadReport()
    position = part_start = start + parts.parts * part_size
    bar = tqdm(total=None if stop is None else stop - start, initial=position - start,
               desc=f"embed r{rank}", unit="img", disable=not progress)
    batches, keys, meta, skipped = _Batches(model, batch_size), [], [], []
    for key, row, image in islice(iter_data(data, report=report), position, stop):
        try:
            batches.add(prepare(image, model.input_size))
            keys.append(key)
            meta.append(row)
        except DECODE_ERRORS as error:
            skipped.append(_decode_skip(key, row, position, error))
        position += 1
        bar.update(1)
        if position - part_start == part_size:
            parts.write(part_start, position, batches.vectors(), keys, meta, skipped)
            part_start, keys, meta, skipped = position, [], [], []
            batches = _Batches(model, batch_size, dim=batches.dim)
    if position > part_start:
        parts.write(part_start, position, batches.vectors(), keys, meta, skipped)
    bar.close()
    last_rank = rank == world_size - 1
    read_skips = [record for record in report.skipped if record["position"] >= start and
                  (last_rank or stop is None or record["position"] < stop)]
    # in the data's order: what did not decode among what could not be read
    all_skipped = sorted(parts.skipped_in_parts() + read_skips, key=lambda record: record["position"])
    if parts.rows == 0 and world_size == 1:
        raise ValueError(_nothing_embedded(f"{data}: no images to embed", all_skipped))
    # a rank's share is cut from the samples read, so only one rank's promise is its own count
    promised = total if world_size == 1 else None
    return parts.finish(seen=position - start, skipped=all_skipped, dim=batches.dim,
                        promised=promised)


def _nothing_embedded(message: str, skipped: list[dict[str, Any]]) -> str:
    """``message``, with how many samples were skipped and the first one's reason."""
    if not skipped:
        return message
    first = skipped[0]
    key = f" {first['key']}" if first.get("key") else ""
    return f"{message}: all {len(skipped)} skipped (first: {first['where']}{key}: {first['reason']})"
