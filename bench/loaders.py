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
    python -m bench.loaders --shards /tmp/ecom-perf/shards --batch-size 64
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import multiprocessing
import os
import sys
from typing import Any, Callable, Iterator

import torch

from bench.timing import Measurement, conditions, measure
from loaders.build import dali_available, make_options
from loaders.manifest import load_shard_set


def _endless(make_epoch: Callable[[int], Any]) -> Iterator[Any]:
    """Batches across epoch boundaries, so a timed step never ends at an epoch's end."""
    for epoch in itertools.count():
        yield from make_epoch(epoch)


def _loader_stream(shards: str, backend: str, args: argparse.Namespace, variant: str | None = None) -> Iterator[Any]:
    def make_epoch(epoch: int):
        options = make_options(shards, device=args.device, batch_size=args.batch_size,
                               crop_size=args.crop_size, seed=0, epoch=epoch,
                               num_workers=args.workers, shuffle_buffer=args.shuffle_buffer)
        if backend == "torch":
            from loaders.torch_backend import TorchLoader

            return TorchLoader(options)
        from loaders.dali_backend import DaliLoader

        return DaliLoader(options, variant=variant)

    return _endless(make_epoch)


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


def _baseline_stream(urls: list[str], args: argparse.Namespace, *, tensor_decode: bool) -> Iterator[Any]:
    import webdataset

    if tensor_decode:
        dataset = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).map(
            lambda sample: _two_crops_tensor(args.crop_size)(sample["jpg"]))
    else:
        dataset = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").map(
            lambda sample: _two_crops_pil(args.crop_size)(sample["jpg"]))
    dataset = dataset.batched(args.batch_size, collation_fn=_collate, partial=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=args.workers,
                                         persistent_workers=args.workers > 0)
    return _endless(lambda epoch: loader)


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every selected measurement and return the JSON-ready report."""
    shard_set = load_shard_set(args.shards)
    urls = [shard.url for shard in shard_set.shards]
    device = torch.device(args.device)
    items = args.batches * args.batch_size
    results: list[Measurement] = []

    def timed(name: str, stream: Iterator[Any]) -> None:
        def step() -> None:
            for _ in range(args.batches):
                next(stream)

        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results.append(measure(name, step, items=items, warmup=args.warmup, repeats=args.repeats,
                               device=device))

    selected = set(args.only.split(",")) if args.only else None

    def wanted(name: str) -> bool:
        return selected is None or any(name.startswith(s) for s in selected)

    if dali_available():
        from loaders.dali_backend import variants_for

        kind = "dali-gpu" if device.type == "cuda" else "dali-cpu"
        for variant in variants_for(device.type == "cuda"):
            if wanted(f"{kind}/{variant}"):
                timed(f"{kind}/{variant}", _loader_stream(args.shards, "dali", args, variant))
    if wanted("torch"):
        timed("torch", _loader_stream(args.shards, "torch", args))
    if wanted("baseline-a"):
        timed("baseline-a", _baseline_stream(urls, args, tensor_decode=False))
    if wanted("baseline-b"):
        timed("baseline-b", _baseline_stream(urls, args, tensor_decode=True))
    if wanted("decode-limit"):
        blobs = _jpeg_blobs(urls, args.decode_images)
        processes = args.workers or 1
        parts = [blobs[i::processes] for i in range(processes)]
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            print("measuring decode-limit ...", file=sys.stderr, flush=True)
            results.append(measure("decode-limit", lambda: pool.map(_decode_all, parts),
                                   items=len(blobs), warmup=1, repeats=args.repeats))

    by_name = {m.name: m.median_rate for m in results}
    ratios = {}
    for name, rate in by_name.items():
        if name.startswith("dali") or name == "torch":
            for reference in ("baseline-a", "baseline-b", "decode-limit"):
                if reference in by_name:
                    ratios[f"{name} / {reference}"] = rate / by_name[reference]
    return {"conditions": {**conditions(device), "batch_size": args.batch_size,
                           "crop_size": args.crop_size, "workers": args.workers,
                           "batches_per_repeat": args.batches, "shards": args.shards,
                           "samples": shard_set.num_samples},
            "results": [m.as_dict() for m in results], "ratios": ratios}


def print_table(report: dict[str, Any]) -> None:
    print(" ".join(f"{k}={v}" for k, v in report["conditions"].items()
                   if k in ("device", "device_name", "cpu_count", "batch_size", "crop_size", "workers", "samples")))
    print(f"{'loader':28s} {'images/s':>10s} {'min':>10s} {'max':>10s}")
    for row in report["results"]:
        print(f"{row['name']:28s} {row['median_per_s']:10.1f} {row['min_per_s']:10.1f} {row['max_per_s']:10.1f}")
    for name, ratio in report["ratios"].items():
        print(f"{name:40s} {ratio:6.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="example: python -m bench.loaders --shards /tmp/ecom-perf/shards --batch-size 64")
    parser.add_argument("--shards", required=True, help="shard directory, manifest or pattern")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="DataLoader workers / DALI threads / decode processes (default: cores)")
    parser.add_argument("--batches", type=int, default=20, help="batches per timed repetition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--decode-images", type=int, default=2000, help="JPEGs for the decode limit")
    parser.add_argument("--only", default="", help="comma-separated name prefixes, e.g. dali,baseline-a")
    parser.add_argument("--json", default="", help="also write the report here")
    args = parser.parse_args(argv)
    for name in ("batch_size", "crop_size", "batches", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    report = run(args)
    print_table(report)
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as stream:
            stream.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
