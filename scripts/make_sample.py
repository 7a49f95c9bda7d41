"""Build the bundled sample: product-like listing photos from public-domain clip art.

Each *item* is one clip-art object from Debian's ``openclipart-png`` (public domain). Each item is
"listed" several times, as different shops would photograph it: another background, scale,
position, small rotation, mirror, shadow and JPEG quality. The result is ``items.csv`` (path,
item_id, region, shop, title) beside the JPEGs, deterministic under ``--seed``.

Usage (needs ``apt-get install openclipart-png``)::

    python scripts/make_sample.py --out ecomaug/assets/sample --items 80 --per-item 4
"""

from __future__ import annotations

import argparse
import csv
import random
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

CLIPART = Path("/usr/share/openclipart/png")
CATEGORIES = ("food", "containers", "electronics", "office", "tools", "transportation",
              "recreation", "plants", "computer", "decorations", "animals", "education")
REGIONS = ("SG", "VN", "MY", "PH", "TH", "ID")
BACKGROUNDS = ((255, 255, 255), (246, 246, 246), (238, 240, 243), (250, 246, 238), (242, 247, 242),
               (252, 243, 245), (235, 235, 235))


def colourful_enough(image: Image.Image) -> bool:
    """Keep objects with real colour and enough opaque area (not line art, not specks)."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    opaque = rgba[..., 3] > 0.5
    if opaque.mean() < 0.15:
        return False
    rgb = rgba[..., :3][opaque]
    saturation = rgb.max(axis=1) - rgb.min(axis=1)
    return float(saturation.mean()) > 0.18 and float(rgb.mean()) > 0.12


def candidates(rng: random.Random) -> list[Path]:
    paths = sorted(p for c in CATEGORIES for p in (CLIPART / c).rglob("*.png"))
    rng.shuffle(paths)
    return paths


def load_object(path: Path) -> Image.Image | None:
    try:
        image = Image.open(path)
        image.load()
    except Exception:  # some clip art files are broken; skip them
        return None
    if image.mode != "RGBA":
        return None
    box = image.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    if box is None:
        return None
    image = image.crop(box)
    if min(image.size) < 120 or max(image.size) / min(image.size) > 2.5:
        return None
    image.thumbnail((600, 600), Image.LANCZOS)
    return image if colourful_enough(image) else None


def background(rng: random.Random, size: int) -> Image.Image:
    colour = rng.choice(BACKGROUNDS)
    canvas = Image.new("RGB", (size, size), colour)
    if rng.random() < 0.35:  # a soft vertical gradient, as on a studio sweep
        top = np.array(colour, dtype=np.float32)
        bottom = top * rng.uniform(0.86, 0.95)
        ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        pixels = top * (1 - ramp) + bottom * ramp
        canvas = Image.fromarray(np.broadcast_to(pixels, (size, size, 3)).astype(np.uint8))
    return canvas


def listing_photo(obj: Image.Image, rng: random.Random, size: int) -> Image.Image:
    canvas = background(rng, size)
    item = ImageOps.mirror(obj) if rng.random() < 0.3 else obj
    item = item.rotate(rng.uniform(-12, 12), resample=Image.BICUBIC, expand=True)
    scale = rng.uniform(0.55, 0.88) * size / max(item.size)
    item = item.resize((max(1, round(item.width * scale)), max(1, round(item.height * scale))),
                       Image.LANCZOS)
    x = round((size - item.width) / 2 + rng.uniform(-0.08, 0.08) * size)
    y = round((size - item.height) / 2 + rng.uniform(-0.08, 0.08) * size)
    x, y = min(max(x, 0), size - item.width), min(max(y, 0), size - item.height)
    if rng.random() < 0.5:  # a soft drop shadow
        shadow = Image.new("RGBA", item.size, (0, 0, 0, 0))
        shadow.putalpha(item.getchannel("A").point(lambda a: a * 0.28))
        shadow = shadow.filter(ImageFilter.GaussianBlur(6))
        canvas.paste(shadow, (x + 6, y + 8), shadow)
    canvas.paste(item, (x, y), item)
    return canvas


def title_from(path: Path) -> str:
    words = re.sub(r"[_\-]+", " ", path.stem)
    words = re.sub(r"\b\d+\b", "", words).strip()
    return " ".join(words.split()[:4]) or path.stem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("ecomaug/assets/sample"))
    parser.add_argument("--items", type=int, default=80)
    parser.add_argument("--per-item", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=20261123)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, used = [], []
    for path in candidates(rng):
        if len(used) == args.items:
            break
        obj = load_object(path)
        if obj is None:
            continue
        item_id = f"item{len(used):03d}"
        used.append((item_id, path))
        for listing in range(args.per_item):
            photo = listing_photo(obj, rng, args.size)
            name = f"images/{item_id}_{listing}.jpg"
            photo.save(out / name, "JPEG", quality=rng.choice((82, 86, 90)), optimize=True)
            rows.append({"path": name, "item_id": item_id, "region": rng.choice(REGIONS),
                         "shop": f"shop{rng.randrange(40):02d}", "title": title_from(path)})
    if len(used) < args.items:
        raise SystemExit(f"only {len(used)} usable clip-art objects found, wanted {args.items}")
    with open(out / "items.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=["path", "item_id", "region", "shop", "title"])
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "SOURCES.txt", "w", encoding="utf-8") as stream:
        for item_id, path in used:
            stream.write(f"{item_id}\t{path.relative_to(CLIPART)}\n")
    print(f"{len(rows)} images of {len(used)} items -> {out}")


if __name__ == "__main__":
    main()
