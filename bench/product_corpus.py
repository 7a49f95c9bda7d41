"""A product-photo corpus for the robustness benchmark, built from Debian's freely licensed clip art.

Every item is one picture of ``openclipart-png`` (cut out along its alpha channel), photographed
as a listing would be: composited at a random size, position and small tilt on a white, tinted,
gradient or photo background (crops of the wallpaper packages :data:`bench.corpus.WALLPAPER_PACKAGES`;
plain and gradient only when none is installed). The clip-art files are split by a hash of their
path into training items and evaluation items, so no evaluation item is ever trained on, and a
drawing that is a twin of one already taken (:data:`TWIN_COSINE`; evaluation items are taken first)
is skipped, so no two items look the same:

* ``train/``: ``train_images`` images, one listing photo per training item (unlabeled), or with
  ``train_photos_per_item`` > 1 that many photos of each item, each shot anew (other size, position,
  tilt and background, as ``"shops"`` below), with ``item_id``: a listing's several photos, for
  ``train.py --listing-positives``;
* ``eval/``: ``eval_items`` items with ``images_per_item`` listing photos each, with ``item_id``,
  for ``ecomaug eval``: the first (the gallery's) is the maker's studio shot on white, the others
  the same photo as other shops list it (``eval_variation="stock"``: slightly cropped and
  re-encoded; the query disturbances do the rest) or shot anew (``"shops"``: other size,
  position and tilt on tinted, gradient and photo backgrounds; much harder).

Both become shards with ``loaders.convert``. Nothing is committed: the corpus lives in a cache
folder and is rebuilt only when its settings change.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import random
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from bench.corpus import WALLPAPER_PACKAGES

_LOG = logging.getLogger(__name__)

CLIPART_ROOT = Path("/usr/share/openclipart/png")
PHOTO_ROOTS = (Path("/usr/share/backgrounds"), Path("/usr/share/wallpapers"))
DEBIAN_PACKAGES = ("openclipart-png",)
CORPUS_VERSION = 7
# Two cut-outs whose 16 x 16 colour thumbnails (one of them mirrored or not) have this cosine or more are one
# drawing twice (openclipart holds dozens of near-identical spirograph rings, an arrow and its mirror image,
# one box in two files): the first is kept, the others skipped, so that no evaluation item has a twin in the
# gallery, among the multi-item companions or in training. Version 6 had them: 58 of the fine-tune's 186
# multi-item misses retrieved a gallery twin of a companion on the canvas (docs/finetune.md#twin-items).
TWIN_COSINE = 0.9
SIGNATURE_SIDE = 16
# How an item's listing photos differ from the gallery's studio shot. "stock": other shops
# reuse the maker's photo, cropped a little and re-encoded, so that the disturbances are what
# the benchmark measures; "shops": every shop shoots its own: other size, position and tilt on
# white, tinted, gradient or photo backgrounds (much harder: instance discrimination on single
# photos never sees one item framed twice or on two backgrounds).
EVAL_VARIATIONS = {
    "stock": None,
    "shops": ((0.2, 0.4, 0.25, 0.15), {"scale": (0.55, 0.9), "tilt": 10.0}),
}


def recrop(photo: Image.Image, rng: random.Random, keep: tuple[float, float] = (0.9, 1.0)) -> Image.Image:
    """The same photo as another shop lists it: a crop keeping 90-100 % of each side, resized back."""
    side = photo.width
    width = round(side * rng.uniform(*keep))
    height = round(side * rng.uniform(*keep))
    left, top = rng.randint(0, side - width), rng.randint(0, side - height)
    return photo.crop((left, top, left + width, top + height)).resize((side, side), Image.BICUBIC)


@dataclass(frozen=True)
class CorpusSettings:
    """What the corpus is built from; a cached corpus is reused only when these match."""

    train_images: int = 3000
    eval_items: int = 400
    images_per_item: int = 3
    size: int = 160
    seed: int = 0
    eval_variation: str = "stock"
    train_photos_per_item: int = 1
    version: int = CORPUS_VERSION


def clipart_files(root: Path = CLIPART_ROOT) -> list[Path]:
    """Every clip-art PNG, sorted, so the split is the same on every machine."""
    if not root.is_dir():
        raise FileNotFoundError(2, "openclipart-png is not installed (apt-get install openclipart-png)",
                                str(root))
    return sorted(root.rglob("*.png"))


def photo_files() -> list[Path]:
    """Photographic backgrounds (wallpaper packages), sorted; empty when none is installed."""
    files: list[Path] = []
    for root in PHOTO_ROOTS:
        if root.is_dir():
            files += [p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    return sorted(files)


def is_eval_item(path: Path, root: Path, fraction: float) -> bool:
    """The split: a stable hash of the path inside the clip-art root decides train or eval."""
    digest = hashlib.sha1(str(path.relative_to(root)).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


@contextlib.contextmanager
def open_packaged(path: Path) -> Iterator[Image.Image]:
    """``Image.open`` without Pillow's bomb warning: the packaged drawings and wallpapers are trusted,
    and some are 90-180 MP (over twice the limit still raises ``DecompressionBombError``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            yield image


def load_item(path: Path, max_side: int) -> Image.Image | None:
    """The clip art as RGBA, cut to its visible part and shrunk; None when unusable."""
    try:
        with open_packaged(path) as image:
            image.draft("RGBA", (max_side * 2, max_side * 2))
            image = image.convert("RGBA")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    alpha = np.asarray(image.getchannel("A"))
    if alpha.min() > 250:  # no transparency: not a cut-out item
        return None
    box = image.getchannel("A").point(lambda value: 255 if value > 16 else 0).getbbox()
    if box is None:
        return None
    image = image.crop(box)
    if max(image.size) < 48 or min(image.size) < 12:
        return None
    coverage = float((np.asarray(image.getchannel("A")) > 16).mean())
    if coverage < 0.15:  # thin line art: nothing to recognise
        return None
    image.thumbnail((max_side, max_side), Image.LANCZOS)
    return image


def thumbnail_signature(item: Image.Image, side: int = SIGNATURE_SIDE) -> np.ndarray:
    """The cut-out on white, padded square, as a ``side`` x ``side`` colour thumbnail, centred and of unit
    length: as it is and mirrored (2 x ``3 * side * side``)."""
    canvas = Image.new("RGBA", (max(item.size),) * 2, (255, 255, 255, 255))
    canvas.alpha_composite(item, ((canvas.width - item.width) // 2, (canvas.height - item.height) // 2))
    thumbnail = canvas.convert("RGB").resize((side, side), Image.BOX)
    rows = []
    for image in (thumbnail, ImageOps.mirror(thumbnail)):
        values = np.asarray(image, dtype=np.float32).ravel()
        values = values - values.mean()
        rows.append(values / max(float(np.linalg.norm(values)), 1e-6))
    return np.stack(rows)


class DistinctItems:
    """The cut-outs kept so far: :meth:`admit` skips one that is a twin of any of them (:data:`TWIN_COSINE`)."""

    def __init__(self) -> None:
        self.kept = np.zeros((0, 3 * SIGNATURE_SIDE ** 2), dtype=np.float32)
        self.count = 0
        self.twins = 0

    def admit(self, item: Image.Image) -> bool:
        """Keep ``item`` unless it is a twin of a kept one (then count it in :attr:`twins`)."""
        signature = thumbnail_signature(item)
        if self.count and float((self.kept[:self.count] @ signature.T).max()) >= TWIN_COSINE:
            self.twins += 1
            return False
        if self.count == len(self.kept):  # grow by doubling
            grown = np.zeros((max(64, 2 * self.count), signature.shape[1]), dtype=np.float32)
            grown[:self.count] = self.kept[:self.count]
            self.kept = grown
        self.kept[self.count] = signature[0]
        self.count += 1
        return True


class Backgrounds:
    """Draws plain, gradient and photo backgrounds from a seeded generator."""

    def __init__(self, photos: Sequence[Path], size: int) -> None:
        self.size = size
        self.photos: list[Image.Image] = []
        for path in photos:
            try:
                with open_packaged(path) as photo:
                    photo.draft("RGB", (size * 4, size * 4))
                    photo = photo.convert("RGB")
                    photo.thumbnail((size * 4, size * 4))
                    self.photos.append(photo)
            except (OSError, ValueError, Image.DecompressionBombError):
                continue

    def draw(self, rng: random.Random, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> Image.Image:
        """A background; ``weights`` of white, plain, gradient and photo (photo only when installed)."""
        kinds = ["white", "plain", "gradient", "photo"][:4 if self.photos else 3]
        kind = rng.choices(kinds, weights=list(weights)[:len(kinds)])[0]
        size = self.size
        if kind == "white":  # a studio shot: near-white, neutral
            tone = rng.randint(236, 255)
            return Image.new("RGB", (size, size), (tone, tone, tone))
        if kind == "plain":
            tone = rng.randint(150, 255)
            colour = tuple(int(min(255, max(0, tone + rng.randint(-40, 40)))) for _ in range(3))
            return Image.new("RGB", (size, size), colour)
        if kind == "gradient":
            start = np.array([rng.randint(60, 255) for _ in range(3)], dtype=np.float32)
            stop = np.array([rng.randint(60, 255) for _ in range(3)], dtype=np.float32)
            angle = rng.uniform(0, 2 * math.pi)
            ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
            t = (xs * math.cos(angle) + ys * math.sin(angle))
            t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
            pixels = start + (stop - start) * t[..., None]
            return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        photo = rng.choice(self.photos)
        side = rng.randint(min(photo.size) // 3, min(photo.size))
        left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        return photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)


def compose(item: Image.Image, background: Image.Image, rng: random.Random, *,
            scale: tuple[float, float] = (0.55, 0.9), tilt: float = 10.0) -> Image.Image:
    """One listing photo: the item at ``scale`` of the frame, anywhere inside it, tilted up to ``tilt`` degrees."""
    size = background.width
    tilted = item.rotate(rng.uniform(-tilt, tilt), expand=True, resample=Image.BICUBIC)
    scale = rng.uniform(*scale) * size / max(tilted.size)
    tilted = tilted.resize((max(1, round(tilted.width * scale)), max(1, round(tilted.height * scale))),
                           Image.LANCZOS)
    left = rng.randint(0, max(0, size - tilted.width))
    top = rng.randint(0, max(0, size - tilted.height))
    canvas = background.convert("RGBA")
    canvas.alpha_composite(tilted, (left, top))
    return canvas.convert("RGB")


def _write(image: Image.Image, path: Path, rng: random.Random) -> None:
    image.save(path, format="JPEG", quality=rng.randint(85, 95))


def build_corpus(out_dir: str | Path, settings: CorpusSettings = CorpusSettings(), *,
                 clipart_root: Path = CLIPART_ROOT, photos: Sequence[Path] | None = None,
                 progress: bool = True) -> dict[str, Path]:
    """Build (or reuse) the corpus and its shards under ``out_dir``.

    Args:
        out_dir: the cache folder.
        settings: sizes and seed.
        clipart_root: a folder of RGBA item cut-outs (default: Debian's openclipart-png).
        photos: background photos (default: the installed wallpaper packages).
        progress: show progress bars.

    Returns:
        ``{"train": shards dir, "eval": shards dir, "eval_csv": items csv, "root": out_dir}``.
    """
    from tqdm.auto import tqdm

    from loaders.convert import convert_to_shards

    out = Path(out_dir)
    stamp = out / "corpus.json"
    paths = {"train": out / "train-shards", "eval": out / "eval-shards", "eval_csv": out / "eval.csv",
             "root": out}
    photos = photo_files() if photos is None else sorted(photos)
    if not photos:
        _LOG.warning("no background photos (%s): the corpus gets plain and gradient backgrounds only, unlike "
                     "the published figures; apt-get install -y %s", ", ".join(map(str, PHOTO_ROOTS)),
                     " ".join(WALLPAPER_PACKAGES))
    made_from = {"clipart_root": str(clipart_root), "photos": [str(p) for p in photos]}
    if stamp.is_file():
        built = json.loads(stamp.read_text())
        if built["settings"] == asdict(settings) and built.get("made_from") == made_from:
            return paths
    files = clipart_files(clipart_root)
    rng = random.Random(settings.seed)
    eval_fraction = 0.2
    eval_files = [p for p in files if is_eval_item(p, clipart_root, eval_fraction)]
    train_files = [p for p in files if not is_eval_item(p, clipart_root, eval_fraction)]
    rng.shuffle(eval_files), rng.shuffle(train_files)
    photographer = Photographer(out, settings, Backgrounds(photos, settings.size),
                                rng, clipart_root)
    for name in ("train", "eval"):
        (out / name).mkdir(parents=True, exist_ok=True)
    with tqdm(total=settings.train_images + settings.eval_items, desc="product corpus",
              disable=not progress, unit="item") as bar:
        # evaluation items first: a training item that is a twin of one is skipped, not trained on
        eval_rows, items = photographer.eval_photos(eval_files, bar)
        train_rows = photographer.train_photos(train_files, bar)
    if len(train_rows) < settings.train_images or items < settings.eval_items:
        raise ValueError(f"only {len(train_rows)} training images and {items} evaluation items could be "
                         f"made from {len(files)} clip-art files; lower --train-images/--eval-items")
    for rows, csv_path in ((train_rows, out / "train.csv"), (eval_rows, paths["eval_csv"])):
        with csv_path.open("w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    for csv_path, shards in ((out / "train.csv", paths["train"]), (paths["eval_csv"], paths["eval"])):
        convert_to_shards(csv_path, shards, shard_size=512, max_size=settings.size, workers=1,
                          progress=progress)
    stamp.write_text(json.dumps({"settings": asdict(settings), "made_from": made_from,
                                 "twins_skipped": photographer.distinct.twins}, indent=2))
    return paths


class Photographer:
    """Takes the corpus' listing photos into ``out``, all from one seeded generator, in a fixed order."""

    def __init__(self, out: Path, settings: CorpusSettings, backgrounds: Backgrounds, rng: random.Random,
                 clipart_root: Path) -> None:
        self.out, self.settings, self.backgrounds, self.rng = out, settings, backgrounds, rng
        self.clipart_root = clipart_root
        self.distinct = DistinctItems()

    def train_photos(self, files: Sequence[Path], bar: Any) -> list[dict[str, str]]:
        """``train_photos_per_item`` listing photos per usable training item (an item's rows adjacent),
        up to ``train_images`` in all; their csv rows (with ``item_id`` when an item has several)."""
        rows: list[dict[str, str]] = []
        per_item = self.settings.train_photos_per_item
        weights, framing = EVAL_VARIATIONS["shops"]
        items = 0
        for path in files:
            if len(rows) >= self.settings.train_images:
                break
            item = load_item(path, self.settings.size)
            if item is None or not self.distinct.admit(item):  # unusable, or a twin of an item kept
                continue
            for _ in range(min(per_item, self.settings.train_images - len(rows))):
                name = f"train/{len(rows):05d}.jpg"
                photo = (compose(item, self.backgrounds.draw(self.rng), self.rng) if per_item == 1
                         else compose(item, self.backgrounds.draw(self.rng, weights), self.rng, **framing))
                _write(photo, self.out / name, self.rng)
                row = {"path": name, "clipart": str(path.relative_to(self.clipart_root))}
                rows.append({**row, "item_id": f"train{items:05d}"} if per_item > 1 else row)
                bar.update(1)
            items += 1
        return rows

    def eval_photos(self, files: Sequence[Path], bar: Any) -> tuple[list[dict[str, str]], int]:
        """``images_per_item`` photos of each usable evaluation item, the studio shot first; rows and items."""
        settings, rng = self.settings, self.rng
        rows: list[dict[str, str]] = []
        items = 0
        for path in files:
            if items >= settings.eval_items:
                break
            item = load_item(path, settings.size)
            if item is None or not self.distinct.admit(item):  # unusable, or a twin of an item kept
                continue
            studio = compose(item, self.backgrounds.draw(rng, (1.0, 0.0, 0.0, 0.0)), rng, scale=(0.7, 0.9), tilt=5.0)
            for view in range(settings.images_per_item):
                name = f"eval/{items:04d}_{view}.jpg"
                if view == 0:  # the gallery's photo: the maker's studio shot
                    photo = studio
                elif settings.eval_variation == "stock":
                    photo = recrop(studio, rng)
                else:
                    weights, framing = EVAL_VARIATIONS["shops"]
                    photo = compose(item, self.backgrounds.draw(rng, weights), rng, **framing)
                _write(photo, self.out / name, rng)
                rows.append({"path": name, "item_id": f"item{items:04d}",
                             "clipart": str(path.relative_to(self.clipart_root))})
            items += 1
            bar.update(1)
        return rows, items
