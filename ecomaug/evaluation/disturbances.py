"""Query disturbances for the robustness report, written apart from the training augmentations.

Each disturbance maps one clean PIL image to a disturbed one, drawing every choice from the
``random.Random`` it is given, so a query set is the same for every model and every run. None of
them reuses code, pools or ranges of ``ecomaug.augmentation`` / ``ecomaug.recipes``, so the report
does not merely measure how well a model memorised its own training transforms:

* ``clean``: a JPEG re-encode at quality 40-75 (the control: no content change).
* ``perspective``: the photo of the listing taken at an angle: the image plane turned 25-50
  degrees about a random in-plane axis plus a 0-20 degree roll, projected by a pinhole camera
  with OpenCV's ``warpPerspective`` and shrunk to fit, so corners move outwards as well as in
  (training moves corners inwards only, with Kornia); the uncovered area is a random tone.
* ``watermark``: text marks drawn with PIL in the fonts matplotlib ships (DejaVu Serif and
  Mono, STIX, Computer Modern; the training pool is the bundled watermark images), with words
  of their own, as one big diagonal mark, a boxed corner mark, or a tiled pattern over the image.
* ``colour``: the item recoloured: its hue turned by 0.2-0.8 of a turn in OpenCV's HSV, only
  where it is saturated (the light background stays), unlike the trainer's chroma-plane rotation.
* ``multi_item``: the item on a canvas among 1-5 other items (a bundle or a shop banner).
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image, ImageFont

from ecomaug.limits import DISTURBANCES  # defined there, torch-free, for `ecomaug eval --help`
from ecomaug.marks import render_text_mark

# Marks unlike any a training pool would hold: invented shop names, slogans and notices.
WATERMARK_WORDS = ("SAMPLE", "© Lumenbay", "kedai-murah.id", "PROOF", "not for resale",
                   "Toko Sinar", "@bargain.hub", "ORIGINAL 100%", "shopnow.vn", "Harga Promo",
                   "preview only", "Gia Tot!", "QC PASSED", "#1 seller")
_FONT_FILES = ("DejaVuSerif.ttf", "DejaVuSerif-BoldItalic.ttf", "DejaVuSansMono-Bold.ttf",
               "STIXGeneral.ttf", "STIXGeneralBol.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf")


def font_pool() -> list[Path]:
    """The fonts watermarks are drawn in (those bundled with matplotlib, an install dependency)."""
    import matplotlib

    directory = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = [directory / name for name in _FONT_FILES if (directory / name).is_file()]
    if not fonts:
        raise FileNotFoundError(2, "matplotlib's bundled fonts are missing", str(directory))
    return fonts


def make_rng(seed: int, disturbance: str, key: str) -> random.Random:
    """The generator of one query: fixed by the seed, the disturbance and the sample key only."""
    # String seeds are hashed with SHA-512 by random.Random, independent of PYTHONHASHSEED.
    return random.Random(f"{seed}/{disturbance}/{key}")


def _background_tone(rng: random.Random) -> tuple[int, int, int]:
    base = rng.randint(170, 250)
    return tuple(int(min(255, max(0, base + rng.randint(-20, 20)))) for _ in range(3))  # type: ignore[return-value]


def clean(image: Image.Image, rng: random.Random) -> Image.Image:
    """Re-encode as JPEG at quality 40-75 (the control)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=rng.randint(40, 75))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def perspective(image: Image.Image, rng: random.Random, *, tilt: tuple[float, float] = (25.0, 50.0),
                roll: float = 20.0) -> Image.Image:
    """Photograph the image plane at an angle: a 3-D turn seen through a pinhole camera."""
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    axis_angle = rng.uniform(0.0, 2 * math.pi)  # the in-plane axis the listing turns about
    angle = math.radians(rng.uniform(*tilt))
    axis = np.array([math.cos(axis_angle), math.sin(axis_angle), 0.0])
    rotation, _ = cv2.Rodrigues(axis * angle)
    roll_rotation, _ = cv2.Rodrigues(np.array([0.0, 0.0, math.radians(rng.uniform(-roll, roll))]))
    focal = 1.2 * max(width, height)
    camera = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]])
    homography = camera @ roll_rotation @ rotation @ np.linalg.inv(camera)
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64)
    projected = cv2.perspectiveTransform(corners[None], homography)[0]
    # Shrink and centre the projected listing so all of it stays in the frame.
    low, high = projected.min(axis=0), projected.max(axis=0)
    scale = 0.95 * min(width / (high[0] - low[0]), height / (high[1] - low[1]))
    fit = np.array([[scale, 0, 0], [0, scale, 0], [0, 0, 1.0]])
    fit[:2, 2] = np.array([width, height]) / 2 - scale * (low + high) / 2
    warped = cv2.warpPerspective(pixels, fit @ homography, (width, height), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=_background_tone(rng))
    return Image.fromarray(warped)


_DARK = ((20, 20, 20), (200, 30, 30), (90, 90, 90), (30, 60, 200))
_ANY = _DARK + ((255, 255, 255),)  # white only on a box: listings are mostly on light backgrounds


def _text_colour(rng: random.Random, opacity: float,
                 palette: Sequence[tuple[int, int, int]] = _DARK) -> tuple[int, int, int, int]:
    return (*rng.choice(palette), int(255 * opacity))


def watermark(image: Image.Image, rng: random.Random, *,
              fonts: Sequence[Path] | None = None) -> Image.Image:
    """Draw a text watermark: a big diagonal mark, a boxed corner mark, or a tiled pattern."""
    fonts = list(fonts) if fonts is not None else font_pool()
    base = image.convert("RGBA")
    width, height = base.size
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    text = rng.choice(WATERMARK_WORDS)
    font_path = str(rng.choice(fonts))
    style = rng.choice(("diagonal", "corner", "tiled"))
    opacity = rng.uniform(0.35, 0.7)
    if style == "diagonal":
        size = max(8, int(min(width, height) * rng.uniform(0.12, 0.2)))
        font = ImageFont.truetype(font_path, size)
        mark = render_text_mark(text, font=font, fill=_text_colour(rng, opacity))
        mark = mark.rotate(rng.uniform(20, 45) * rng.choice((-1, 1)), expand=True,
                           resample=Image.BICUBIC)
        if mark.width > width:
            mark = mark.resize((width, max(1, mark.height * width // mark.width)), Image.BICUBIC)
        layer.alpha_composite(mark, ((width - mark.width) // 2, max(0, (height - mark.height) // 2)))
    elif style == "corner":
        size = max(8, int(min(width, height) * rng.uniform(0.07, 0.11)))
        font = ImageFont.truetype(font_path, size)
        colour = _text_colour(rng, min(1.0, opacity + 0.25), _ANY)
        mark = render_text_mark(text, font=font, fill=colour, box=(255 - colour[0], 255 - colour[1],
                                                                  255 - colour[2], int(255 * opacity * 0.8)))
        if mark.width > width:
            mark = mark.resize((width, max(1, mark.height * width // mark.width)), Image.BICUBIC)
        margin = int(0.03 * width)
        x = rng.choice((margin, width - mark.width - margin))
        y = rng.choice((margin, height - mark.height - margin))
        layer.alpha_composite(mark, (max(0, x), max(0, y)))
    else:
        size = max(8, int(min(width, height) * rng.uniform(0.05, 0.08)))
        font = ImageFont.truetype(font_path, size)
        tile = render_text_mark(text, font=font, fill=_text_colour(rng, opacity * 0.8))
        pattern = Image.new("RGBA", (2 * width, 2 * height), (0, 0, 0, 0))
        step_x, step_y = tile.width + size, tile.height + 2 * size
        for row, y in enumerate(range(0, 2 * height, step_y)):
            for x in range(-(row % 2) * step_x // 2, 2 * width, step_x):
                pattern.alpha_composite(tile, (max(0, x), y))
        pattern = pattern.rotate(rng.uniform(15, 40), resample=Image.BICUBIC)
        layer = pattern.crop((width // 2, height // 2, width // 2 + width, height // 2 + height))
    return Image.alpha_composite(base, layer).convert("RGB")


def colour(image: Image.Image, rng: random.Random, *, turn: tuple[float, float] = (0.2, 0.8),
           min_saturation: int = 40) -> Image.Image:
    """Recolour the item: turn the hue of its saturated pixels by 0.2-0.8 of a turn."""
    pixels = np.asarray(image.convert("RGB"))
    hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV)  # OpenCV hue runs 0..179 (2 degrees a step)
    shift = int(round(rng.uniform(*turn) * 180)) % 180
    item = hsv[..., 1] >= min_saturation
    hue = hsv[..., 0].astype(np.int32)
    hsv[..., 0] = np.where(item, (hue + shift) % 180, hue).astype(np.uint8)
    return Image.fromarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))


_LAYOUTS = {2: (2, 1), 3: (3, 1), 4: (2, 2), 5: (3, 2), 6: (3, 2)}  # tiles -> (columns, rows)


def multi_item(image: Image.Image, rng: random.Random, *,
               others: Sequence[Image.Image | Callable[[], Image.Image]]) -> Image.Image:
    """Place the item among 1-5 other items on one canvas of the image's size.

    Args:
        image: the query item's image.
        rng: the query's generator.
        others: images of *other* items to draw the companions from (images or loaders of them).
    """
    if not others:
        raise ValueError("multi_item needs at least one image of another item in 'others'")
    count = rng.randint(1, min(5, len(others)))
    companions = [rng.choice(others) for _ in range(count)]
    companions = [c() if callable(c) else c for c in companions]
    tiles = [image] + companions
    rng.shuffle(tiles)
    width, height = image.size
    columns, rows = _LAYOUTS[len(tiles)]
    if rng.random() < 0.5 and columns != rows:
        columns, rows = rows, columns
    canvas = Image.new("RGB", (width, height), _background_tone(rng))
    cell_w, cell_h = width // columns, height // rows
    cells = [(c, r) for r in range(rows) for c in range(columns)]
    for tile, (column, row) in zip(tiles, rng.sample(cells, len(tiles))):
        scale = rng.uniform(0.8, 1.0) * min(cell_w / tile.width, cell_h / tile.height)
        size = (max(1, int(tile.width * scale)), max(1, int(tile.height * scale)))
        resized = tile.convert("RGB").resize(size, Image.BICUBIC, reducing_gap=3.0)
        x = column * cell_w + rng.randint(0, cell_w - size[0])
        y = row * cell_h + rng.randint(0, cell_h - size[1])
        canvas.paste(resized, (x, y))
    return canvas


def apply_disturbance(name: str, image: Image.Image, rng: random.Random, *,
                      others: Sequence[Image.Image | Callable[[], Image.Image]] = (),
                      fonts: Sequence[Path] | None = None) -> Image.Image:
    """Apply one named disturbance (see :data:`DISTURBANCES`) to an RGB image.

    Raises:
        ValueError: for an unknown name, or ``multi_item`` without other items.
    """
    if name == "clean":
        return clean(image, rng)
    if name == "perspective":
        return perspective(image, rng)
    if name == "watermark":
        return watermark(image, rng, fonts=fonts)
    if name == "colour":
        return colour(image, rng)
    if name == "multi_item":
        return multi_item(image, rng, others=others)
    raise ValueError(f"unknown disturbance {name!r}; choose from {', '.join(DISTURBANCES)}")
