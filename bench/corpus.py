"""A deterministic corpus of listing-size photos for the benchmarks, cut from Debian's wallpapers.

Synthetic noise or flat colours decode at very different speeds from real photos, so the loader,
conversion and pipeline benchmarks measure on photographs: crops of the four wallpaper packages
in :data:`WALLPAPER_PACKAGES`, resized to typical listing sizes (70 % 800 x 800, 15 % 1000 x 1000,
15 % 640 x 853 portrait), JPEG quality 85-95, half of them mirrored. Then ``ecomaug shard``'s
conversion writes them as shards of 512-px JPEGs (quality 90, 256 per shard, DALI indexes):

* ``OUT/src/``: ``--images`` JPEGs, ``000000.jpg`` ...;
* ``OUT/shards/``: the shards, ``manifest.json`` included.

Every random choice of image ``i`` comes from ``random.Random(seed * 1_000_003 + i)``, so the
photos do not depend on the process count. ``OUT/corpus.json`` records the settings; a second
run with the same settings reuses the corpus.

    apt-get install -y plasma-workspace-wallpapers mate-backgrounds lomiri-wallpapers-16.04 lomiri-wallpapers-20.04
    python -m bench corpus /tmp/ecom-perf                 # 4,000 photos, ~1-2 min on 2 cores
    python -m bench loaders --shards /tmp/ecom-perf/shards
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Sequence

import click
from PIL import Image

from bench.harness import BenchCommand

WALLPAPER_PACKAGES = ("plasma-workspace-wallpapers", "mate-backgrounds", "lomiri-wallpapers-16.04",
                      "lomiri-wallpapers-20.04")
PHOTO_GLOBS = (("/usr/share/backgrounds/mate/nature", "*.jpg"), ("/usr/share/backgrounds", "*_by_*.jpg"),
               ("/usr/share/wallpapers", "*/contents/images/*.jpg"))
# Obvious non-photos of those packages (gradients, vector, low-poly or painted art), checked by eye.
NOT_PHOTOS = re.compile(r"(Fossa_by_|Infinite-Sea_by_|Painting-Colors_by_|umang_by_"
                        r"|/wallpapers/(Autumn|Flow|Honeywave|PastelHills|SafeLanding|Shell|Volna)/)")
LISTING_SIZES = (((800, 800), 0.70), ((1000, 1000), 0.15), ((640, 853), 0.15))


@dataclass(frozen=True)
class PhotoCorpusSettings:
    """What the corpus is made of; a change rebuilds it."""

    images: int = 4000
    seed: int = 20240601
    shard_max_size: int = 512
    shard_size: int = 256


def wallpaper_photos() -> list[Path]:
    """The installed wallpaper photos, sorted, without the packages' non-photographs."""
    found = {Path(os.path.realpath(path)) for root, pattern in PHOTO_GLOBS for path in Path(root).glob(pattern)}
    return sorted(path for path in found if not NOT_PHOTOS.search(str(path)))


def _plan(index: int, seed: int, photos: Sequence[Path]) -> dict:
    """Every random choice of photo ``index``: a pure function of ``seed`` and ``index``."""
    rng = random.Random(seed * 1_000_003 + index)
    draw, total, size = rng.random(), 0.0, LISTING_SIZES[-1][0]
    for candidate, share in LISTING_SIZES:
        total += share
        if draw < total:
            size = candidate
            break
    return {"index": index, "photo": str(photos[index % len(photos)]), "size": size,
            "quality": rng.randint(85, 95), "u": [rng.random() for _ in range(4)]}


def _cut_photos(job: tuple[Path, list[dict]]) -> int:
    """Cut every planned listing photo of one wallpaper (opened once); the number written."""
    out_dir, plans = job
    with Image.open(plans[0]["photo"]) as opened:
        photo = opened.convert("RGB")
    width, height = photo.size
    for plan in plans:
        target_w, target_h = plan["size"]
        aspect = target_w / target_h
        widest = min(width, height * aspect)
        lowest = min(1.0, max(0.3, 0.6 * target_w / widest))  # never upscale more than ~1.67x
        crop_w = widest * (lowest + (1.0 - lowest) * plan["u"][0])
        crop_h = crop_w / aspect
        left, top = (width - crop_w) * plan["u"][1], (height - crop_h) * plan["u"][2]
        crop = photo.resize((target_w, target_h), Image.LANCZOS, box=(left, top, left + crop_w, top + crop_h))
        if plan["u"][3] < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(out_dir / f"{plan['index']:06d}.jpg", "JPEG", quality=plan["quality"])
    return len(plans)


def build_photo_corpus(out_dir: str | os.PathLike, settings: PhotoCorpusSettings = PhotoCorpusSettings(), *,
                       workers: int | None = None, progress: bool = True) -> dict[str, Path]:
    """Build (or reuse) the photo corpus and its shards under ``out_dir``.

    Args:
        out_dir: where ``src/``, ``shards/`` and ``corpus.json`` go.
        settings: how many photos, the seed and the shards' size cap and length.
        workers: processes cutting photos and converting them (default: one per core).
        progress: show progress bars.

    Returns:
        ``{"src": folder of photos, "shards": shard folder, "root": out_dir}``.

    Raises:
        ValueError: no wallpaper photos are installed (the message gives the ``apt-get`` line).
    """
    from tqdm.auto import tqdm

    from loaders.convert import convert_to_shards

    out = Path(out_dir)
    paths = {"src": out / "src", "shards": out / "shards", "root": out}
    stamp = out / "corpus.json"
    photos = wallpaper_photos()
    if not photos:
        raise ValueError("no wallpaper photos installed; run: apt-get install -y " + " ".join(WALLPAPER_PACKAGES))
    record = {"settings": asdict(settings), "photos": [str(path) for path in photos]}
    if stamp.is_file() and json.loads(stamp.read_text()) == record:
        return paths
    paths["src"].mkdir(parents=True, exist_ok=True)
    by_photo: dict[str, list[dict]] = {}
    for index in range(settings.images):
        plan = _plan(index, settings.seed, photos)
        by_photo.setdefault(plan["photo"], []).append(plan)
    with Pool(workers or os.cpu_count() or 1) as pool, \
            tqdm(total=settings.images, desc="photos", unit="img", disable=not progress) as bar:
        for written in pool.imap_unordered(_cut_photos, [(paths["src"], plans) for plans in by_photo.values()]):
            bar.update(written)
    convert_to_shards(paths["src"], paths["shards"], shard_size=settings.shard_size,
                      max_size=settings.shard_max_size, quality=90, workers=workers, progress=progress)
    stamp.write_text(json.dumps(record, indent=2))
    return paths


@click.command("corpus", cls=BenchCommand)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--images", type=click.IntRange(min=1, max=1_000_000), default=4000, show_default=True,
              help="Listing photos to cut.")
@click.option("--seed", type=int, default=20240601, show_default=True)
@click.option("--workers", type=click.IntRange(min=1, max=256), default=None,
              help="Processes. Default: one per core.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def main(out_dir: Path, images: int, seed: int, workers: int | None, progress: bool) -> None:
    """Build the benchmarks' photo corpus: listing-size JPEGs cut from Debian's wallpapers, and their shards.

    \b
    Example:
      apt-get install -y plasma-workspace-wallpapers mate-backgrounds lomiri-wallpapers-16.04 lomiri-wallpapers-20.04
      python -m bench corpus /tmp/ecom-perf
      python -m bench loaders --shards /tmp/ecom-perf/shards
    """
    paths = build_photo_corpus(out_dir, PhotoCorpusSettings(images=images, seed=seed), workers=workers,
                               progress=progress)
    print(f"{images} photos in {paths['src']}, shards in {paths['shards']}")
