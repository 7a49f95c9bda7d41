"""Two-view loader throughput: the DALI and PyTorch backends beside what a user would write.

Measures images/s (each image = two ``crop_size`` uint8 views) on the same shards for:

* ``dali-<cpu|gpu>/<variant>``: the DALI backend's graph variants: ``decode_once`` (one full
  decode + two ``random_resized_crop``), ``crop_decode`` (``decoders.image_random_crop`` +
  ``resize`` per view) and, on CPU, ``torch_crops`` (DALI decode and crop windows, torch resize);
* ``torch``: the PyTorch backend (Pillow with ``draft``, DataLoader workers);
* ``baseline-a``: ``webdataset .decode("pil")`` + two torchvision ``RandomResizedCrop`` to uint8
  in a DataLoader with one worker per core;
* ``baseline-b``: the same with ``torchvision.io.decode_jpeg``;
* ``decode-limit``: Pillow full decode of the same JPEGs in a tight loop, one process per core.

Example:
    python -m bench loaders --shards /tmp/ecom-perf/shards --batch-size 64
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import click
import torch

from bench.harness import BenchCommand, parse_device
from bench.pieces import loader_stream
from bench.streams import time_stream
from bench.timing import Measurement, conditions, measure
from loaders.build import dali_available, endless_batches
from loaders.manifest import ShardSet, load_shard_set


@dataclass(frozen=True)
class Settings:
    """What the loader comparison reads and how long; every field is a command option."""

    shards: str | ShardSet
    device: torch.device
    batch_size: int = 64
    crop_size: int = 224
    workers: int = 1
    batches: int = 20
    repeats: int = 5
    warmup: int = 2
    shuffle_buffer: int = 1000
    decode_images: int = 2000
    only: str = ""


def _two_crops_pil(crop_size: int):
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(crop_size, scale=(0.2, 1.0), antialias=True)

    def apply(image):
        return [v2.functional.pil_to_tensor(crop(image)) for _ in range(2)]

    return apply


def _two_crops_tensor(crop_size: int):
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(crop_size, scale=(0.2, 1.0), antialias=True)

    def apply(data: bytes):
        from torchvision.io import ImageReadMode, decode_jpeg

        image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return [crop(image) for _ in range(2)]

    return apply


def _collate(samples):
    return [torch.stack([views[i] for views in samples]) for i in range(2)]


def _baseline_stream(urls: list[str], settings: Settings, *, tensor_decode: bool) -> Iterator[Any]:
    import webdataset

    crop_size = settings.crop_size
    if tensor_decode:
        dataset = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).map(
            lambda sample: _two_crops_tensor(crop_size)(sample["jpg"]))
    else:
        dataset = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").map(
            lambda sample: _two_crops_pil(crop_size)(sample["jpg"]))
    dataset = dataset.batched(settings.batch_size, collation_fn=_collate, partial=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=settings.workers,
                                         persistent_workers=settings.workers > 0)
    return endless_batches(lambda epoch: loader)


def _decode_all(blobs: list[bytes]) -> int:
    from PIL import Image

    for data in blobs:
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB").load()
    return len(blobs)


def _jpeg_blobs(urls: list[str], limit: int) -> list[bytes]:
    from webdataset.tariterators import tarfile_samples

    blobs = []
    for sample in tarfile_samples([{"url": url} for url in urls]):
        blobs.append(sample["jpg"])
        if len(blobs) >= limit:
            break
    return blobs


def run(settings: Settings) -> dict[str, Any]:
    """Run every selected measurement and return the JSON-ready report."""
    shard_set = settings.shards if isinstance(settings.shards, ShardSet) else load_shard_set(settings.shards)
    urls = [shard.url for shard in shard_set.shards]
    device, batches = settings.device, settings.batches
    results: list[Measurement] = []

    def timed(name: str, stream: Iterator[Any]) -> None:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        # warm-up and timed repetitions of ``batches`` batches each
        measurement, _, _ = time_stream(name, stream, batch_size=settings.batch_size, iters=batches,
                                        warmup=settings.warmup * batches, repeats=settings.repeats, device=device)
        results.append(measurement)

    def ours(backend: str, variant: str | None = None) -> Iterator[Any]:
        stream, _ = loader_stream(shard_set, backend=backend, device=device, batch_size=settings.batch_size,
                                  crop_size=settings.crop_size, seed=0, workers=settings.workers,
                                  batches_needed=(settings.warmup + settings.repeats) * batches,
                                  dali_variant=variant, shuffle_buffer=settings.shuffle_buffer)
        return stream

    selected = set(settings.only.split(",")) if settings.only else None

    def wanted(name: str) -> bool:
        return selected is None or any(name.startswith(s) for s in selected)

    if dali_available():
        from loaders.dali_backend import variants_for

        kind = "dali-gpu" if device.type == "cuda" else "dali-cpu"
        for variant in variants_for(device.type == "cuda"):
            if wanted(f"{kind}/{variant}"):
                timed(f"{kind}/{variant}", ours("dali", variant))
    if wanted("torch"):
        timed("torch", ours("torch"))
    for name, tensor_decode in (("baseline-a", False), ("baseline-b", True)):
        if wanted(name):
            timed(name, _baseline_stream(urls, settings, tensor_decode=tensor_decode))
    if wanted("decode-limit"):
        results.append(_decode_limit(urls, settings))
    return {"conditions": {**conditions(device), "batch_size": settings.batch_size,
                           "crop_size": settings.crop_size, "workers": settings.workers,
                           "batches_per_repeat": batches, "shards": str(settings.shards),
                           "samples": shard_set.num_samples},
            "results": [m.as_dict() for m in results], "ratios": _ratios(results)}


def _decode_limit(urls: list[str], settings: Settings) -> Measurement:
    """Pillow full decode of the same JPEGs in a tight loop, one process per worker."""
    blobs = _jpeg_blobs(urls, settings.decode_images)
    processes = settings.workers or 1
    parts = [blobs[i::processes] for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        print("measuring decode-limit ...", file=sys.stderr, flush=True)
        return measure("decode-limit", lambda: pool.map(_decode_all, parts), items=len(blobs), warmup=1,
                       repeats=settings.repeats)


def _ratios(results: list[Measurement]) -> dict[str, float]:
    """Each of our loaders' images/s over each reference's."""
    by_name = {m.name: m.median_rate for m in results}
    ratios = {}
    for name, rate in by_name.items():
        if name.startswith("dali") or name == "torch":
            for reference in ("baseline-a", "baseline-b", "decode-limit"):
                if reference in by_name:
                    ratios[f"{name} / {reference}"] = rate / by_name[reference]
    return ratios


def print_table(report: dict[str, Any]) -> None:
    print(" ".join(f"{k}={v}" for k, v in report["conditions"].items()
                   if k in ("device", "device_name", "cpu_count", "batch_size", "crop_size", "workers", "samples")))
    print(f"{'loader':28s} {'images/s':>10s} {'min':>10s} {'max':>10s}")
    for row in report["results"]:
        print(f"{row['name']:28s} {row['median_per_s']:10.1f} {row['min_per_s']:10.1f} {row['max_per_s']:10.1f}")
    for name, ratio in report["ratios"].items():
        print(f"{name:40s} {ratio:6.2f}x")


POSITIVE = click.IntRange(min=1)


@click.command("loaders", cls=BenchCommand)
@click.option("--shards", required=True, help="Shard directory, manifest or pattern.")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True)
@click.option("--crop-size", type=POSITIVE, default=224, show_default=True)
@click.option("--device", default=None, help="cpu, cuda or cuda:N. Default: cuda when present.")
@click.option("--workers", type=click.IntRange(min=0), default=os.cpu_count() or 1,
              help="DataLoader workers / DALI threads / decode processes. Default: one per core.")
@click.option("--batches", type=POSITIVE, default=20, show_default=True, help="Batches per timed repetition.")
@click.option("--repeats", type=POSITIVE, default=5, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True,
              help="Untimed repetitions first.")
@click.option("--shuffle-buffer", type=int, default=1000, show_default=True)
@click.option("--decode-images", type=POSITIVE, default=2000, show_default=True, help="JPEGs for the decode limit.")
@click.option("--only", default="", help="Comma-separated name prefixes, e.g. dali,baseline-a.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report here (default: print it).")
def main(shards: str, batch_size: int, crop_size: int, device: str | None, workers: int, batches: int,
         repeats: int, warmup: int, shuffle_buffer: int, decode_images: int, only: str,
         json_path: Path | None) -> None:
    """Two-view loader images/s: the DALI and PyTorch backends beside what a user would write.

    \b
    Example:
      python -m bench loaders --shards /tmp/ecom-perf/shards --batch-size 64
      python -m bench loaders --shards /tmp/ecom-perf/shards --only dali,baseline-a --json loaders.json
    """
    settings = Settings(shards=shards, device=parse_device(device), batch_size=batch_size, crop_size=crop_size,
                        workers=workers, batches=batches, repeats=repeats, warmup=warmup,
                        shuffle_buffer=shuffle_buffer, decode_images=decode_images, only=only)
    report = run(settings)
    print_table(report)
    text = json.dumps(report, indent=2)
    if json_path is not None:
        json_path.write_text(text + "\n", encoding="utf-8")
    else:
        click.echo(text)


if __name__ == "__main__":
    main()
