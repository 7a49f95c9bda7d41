"""The mark pool: a folder of logos and a list of words, read as named RGBA images by one rule.

Both directions use it: the training overlay (:mod:`ecomaug.watermark_pool` packs these marks into
its atlas) and the remover (:mod:`ecomaug.dewatermark` looks for them), so a team's scraped pool
is pasted and painted out as the same shapes. The rule: a mark with an alpha channel is taken as
it is; one without (a JPEG, an RGB PNG) has its plain background keyed out. Text marks are drawn
here too, and only here (the evaluation's text disturbance and the bundled pool's script call
:func:`render_text_mark`). Pure Pillow and NumPy: the conversion's worker processes load no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ecomaug.paths import WATERMARK_DIR

MARK_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TEXT_PREFIX = "text:"  # names of text marks: "text:<words>"
TEXT_MARK_HEIGHT = 96  # font size of a pool's text marks, in pixels (the atlas shrinks them to fit)


def load_marks(directory: str | Path | None = None, *, texts: Sequence[str] = (),
               include_default: bool = False) -> list[tuple[str, Image.Image]]:
    """The marks of ``directory`` (the bundled pool if ``None``) and ``texts``, as ``(name, RGBA image)``.

    Args:
        directory: a folder of ``.png``/``.jpg``/``.jpeg``/``.webp`` marks (not searched recursively),
            each named by its file stem.
        texts: extra text marks (e.g. your own shop names), named ``text:<words>``.
        include_default: with a ``directory``, also add the bundled marks.

    Returns:
        The marks in a stable order: files sorted by name, then texts as given.

    Raises:
        FileNotFoundError / NotADirectoryError: ``directory`` is missing or is a file.
        ValueError: no marks at all, two marks with one name, or an image that cannot be read.
    """
    folders = [WATERMARK_DIR] if directory is None else [Path(directory)]
    if directory is not None and include_default:
        folders.append(WATERMARK_DIR)
    marks: list[tuple[str, Image.Image]] = []
    for folder in folders:
        if not folder.exists():
            raise FileNotFoundError(2, "No such watermark directory", str(folder))
        if not folder.is_dir():
            raise NotADirectoryError(20, "Not a directory (expected a folder of mark images)", str(folder))
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in MARK_SUFFIXES and p.is_file())
        marks += [(path.stem, read_mark(path)) for path in files]
    marks += [(f"{TEXT_PREFIX}{text}", render_text_mark(text, height=TEXT_MARK_HEIGHT,
                                                         stroke=max(1, TEXT_MARK_HEIGHT // 24)))
              for text in texts]
    if not marks:
        raise ValueError(f"no watermark images ({', '.join(MARK_SUFFIXES)}) in {folders[0]} and no texts given")
    names = [name for name, _ in marks]
    twins = sorted({name for name in names if names.count(name) > 1})
    if twins:
        raise ValueError(f"mark names must be unique (a name is the file stem), got more than one {twins}")
    return marks


def read_mark(path: str | Path) -> Image.Image:
    """One mark as RGBA; an image without alpha has its plain background keyed out."""
    try:
        with Image.open(path) as image:
            image.load()
            return as_mark(image)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read watermark image {path}: {error}") from error


def as_mark(image: Image.Image) -> Image.Image:
    """``image`` as an RGBA mark by the pool's rule: its own alpha, or its plain background keyed out."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    rgba = image.convert("RGBA")
    return rgba if has_alpha else key_out_background(rgba)


def key_out_background(image: Image.Image, tolerance: float = 0.08, softness: float = 0.12) -> Image.Image:
    """Make pixels near the border's median colour transparent, with a soft ramp of ``softness``."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.abs(pixels - np.median(border, axis=0)).max(axis=-1)
    alpha = np.clip((distance - tolerance) / softness, 0.0, 1.0)
    rgba = np.dstack([pixels, alpha])
    return Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA")


def render_text_mark(text: str, *, font: str | Path | ImageFont.FreeTypeFont | None = None, height: int = 96,
                     fill: Sequence[int] = (255, 255, 255), stroke: int = 0, outline: Sequence[int] = (40, 40, 40),
                     box: Sequence[int] | None = None, pad: int | None = None) -> Image.Image:
    """Draw ``text`` as an RGBA mark: letters (optionally outlined) on transparency or on a filled box.

    Args:
        text: the words; must not be empty.
        font: a TrueType/OpenType file or a loaded font; Pillow's built-in scalable font if ``None``
            (no system fonts needed).
        height: font size in pixels (ignored for a loaded ``font``).
        fill: letter colour, RGB or RGBA.
        stroke: outline width in pixels (0: none); an outline keeps white text readable on white.
        outline: outline colour, RGB or RGBA.
        box: background colour (RGBA) of a filled box behind the words; transparent if ``None``.
        pad: pixels around the words; default ``max(2, text height // 4)`` with a box, else ``max(1, stroke)``.

    Returns:
        The mark, sized to the words plus ``pad`` on every side.
    """
    if not text.strip():
        raise ValueError("a text watermark needs non-empty text")
    if isinstance(font, ImageFont.FreeTypeFont):
        face = font
    else:
        face = ImageFont.truetype(str(font), height) if font is not None else ImageFont.load_default(size=height)
    left, top, right, bottom = face.getbbox(text, stroke_width=stroke)
    if pad is None:
        pad = max(2, (bottom - top) // 4) if box is not None else max(1, stroke)
    image = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad),
                      tuple(box) if box is not None else (0, 0, 0, 0))
    ImageDraw.Draw(image).text((pad - left, pad - top), text, font=face, fill=_rgba(fill), stroke_width=stroke,
                               stroke_fill=_rgba(outline))
    return image


def _rgba(colour: Sequence[int]) -> tuple[int, ...]:
    return tuple(colour) if len(colour) == 4 else (*colour, 255)


__all__ = ["MARK_SUFFIXES", "TEXT_PREFIX", "as_mark", "key_out_background", "load_marks", "read_mark",
           "render_text_mark"]
