"""The watermark pool: a folder of logos (PNG with alpha, or JPEG) and text marks as one RGBA atlas tensor.

Every mark is fitted, aspect kept, into one cell of a grid texture with transparent padding, so the
watermark augmentation samples any mark for any sample with a single ``grid_sample`` on the device.
Colours are stored premultiplied by alpha: bilinear sampling at a mark's edge then fades to nothing
instead of to a dark fringe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ecomaug.paths import WATERMARK_DIR

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CELL_SIZE = (128, 256)  # (height, width) of one atlas cell: room for square logos and wide text
_PADDING = 2  # transparent pixels around each mark, so bilinear samples never reach the next cell


@dataclass
class WatermarkPool:
    """Marks packed into one RGBA texture.

    Attributes:
        atlas: :math:`(4, rows \\cdot H_c, columns \\cdot W_c)` float32, RGB premultiplied by alpha.
        extents: :math:`(K, 2)` each mark's content size (width, height) as a fraction of its cell.
        monochrome: :math:`(K,)` bool, True for one-colour marks (text) that may be recoloured.
        names: where each mark came from (file name, or ``text:<words>``).
        columns: cells per atlas row; mark ``k`` sits in row ``k // columns``, column ``k % columns``.
        cell_size: ``(height, width)`` of one cell in pixels.
    """

    atlas: torch.Tensor
    extents: torch.Tensor
    monochrome: torch.Tensor
    names: list[str]
    columns: int
    cell_size: tuple[int, int] = CELL_SIZE

    def __len__(self) -> int:
        return len(self.names)

    def to(self, device: torch.device | str) -> "WatermarkPool":
        """The same pool with its tensors on ``device``."""
        return WatermarkPool(self.atlas.to(device), self.extents.to(device), self.monochrome.to(device),
                             list(self.names), self.columns, self.cell_size)


def load_watermark_pool(directory: str | Path | None = None, *, texts: Sequence[str] = (),
                        device: torch.device | str = "cpu", include_default: bool = False) -> WatermarkPool:
    """Load logos from ``directory`` (the bundled pool if ``None``) and render ``texts`` into one atlas.

    JPEGs and PNGs without alpha get their background keyed out: pixels close to the median colour
    of the image border become transparent (scraped logos usually sit on a plain background).

    Args:
        directory: a folder of ``.png``/``.jpg``/``.jpeg``/``.webp`` marks (not searched recursively).
        texts: extra text marks (e.g. your own shop names), drawn with Pillow's built-in font.
        device: where the atlas lives.
        include_default: with a ``directory``, also add the bundled marks.

    Returns:
        The pool, on ``device``.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        ValueError: no usable marks, or an image that cannot be read.
    """
    marks: list[tuple[str, Image.Image]] = []
    folders = [WATERMARK_DIR] if directory is None else [Path(directory)]
    if directory is not None and include_default:
        folders.append(WATERMARK_DIR)
    for folder in folders:
        if not folder.exists():
            raise FileNotFoundError(2, "No such watermark directory", str(folder))
        if not folder.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(folder))
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            marks.append((path.name, read_mark(path)))
    marks += [(f"text:{text}", render_text_mark(text)) for text in texts]
    if not marks:
        raise ValueError(f"no watermark images ({', '.join(IMAGE_SUFFIXES)}) in {folders[0]} and no texts given")
    return pack_atlas(marks).to(device)


def read_mark(path: Path) -> Image.Image:
    """One mark as RGBA; an image without alpha has its plain background keyed out."""
    try:
        with Image.open(path) as image:
            image.load()
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            image = image.convert("RGBA")
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read watermark image {path}: {error}") from error
    return image if has_alpha else key_out_background(image)


def key_out_background(image: Image.Image, tolerance: float = 0.08, softness: float = 0.12) -> Image.Image:
    """Make pixels near the border's median colour transparent, with a soft ramp of ``softness``."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.abs(pixels - np.median(border, axis=0)).max(axis=-1)
    alpha = np.clip((distance - tolerance) / softness, 0.0, 1.0)
    rgba = np.dstack([pixels, alpha])
    return Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA")


def render_text_mark(text: str, *, height: int = 96, font: str | Path | None = None, fill=(255, 255, 255),
                     outline=(40, 40, 40)) -> Image.Image:
    """Draw ``text`` as an RGBA mark: filled letters with a thin outline, on transparency.

    Args:
        text: the words; must not be empty.
        height: font size in pixels.
        font: a TrueType/OpenType file; Pillow's built-in scalable font if ``None`` (no system fonts needed).
        fill: letter colour.
        outline: outline colour (keeps white text readable on white products).
    """
    if not text.strip():
        raise ValueError("a text watermark needs non-empty text")
    face = ImageFont.truetype(str(font), height) if font is not None else ImageFont.load_default(size=height)
    stroke = max(1, height // 24)
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGBA", (1, 1))).textbbox(
        (0, 0), text, font=face, stroke_width=stroke)
    image = Image.new("RGBA", (right - left + 2 * stroke, bottom - top + 2 * stroke), (0, 0, 0, 0))
    ImageDraw.Draw(image).text((stroke - left, stroke - top), text, font=face, fill=fill + (255,),
                               stroke_width=stroke, stroke_fill=outline + (255,))
    return image


def pack_atlas(marks: Sequence[tuple[str, Image.Image]], cell_size: tuple[int, int] = CELL_SIZE) -> WatermarkPool:
    """Fit each RGBA mark into a cell (aspect kept, centred) of one premultiplied RGBA texture."""
    cell_h, cell_w = cell_size
    columns = max(1, math.ceil(math.sqrt(len(marks))))
    rows = math.ceil(len(marks) / columns)
    atlas = np.zeros((rows * cell_h, columns * cell_w, 4), dtype=np.float32)
    extents, monochrome = [], []
    for index, (name, mark) in enumerate(marks):
        box = mark.getbbox()  # crop transparent margins so "scale" means the visible mark
        mark = mark.crop(box) if box else mark
        fit = min((cell_w - 2 * _PADDING) / mark.width, (cell_h - 2 * _PADDING) / mark.height)
        width, height = max(1, round(mark.width * fit)), max(1, round(mark.height * fit))
        pixels = np.asarray(mark.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
        top = (index // columns) * cell_h + (cell_h - height) // 2
        left = (index % columns) * cell_w + (cell_w - width) // 2
        alpha = pixels[..., 3:]
        atlas[top:top + height, left:left + width] = np.concatenate([pixels[..., :3] * alpha, alpha], axis=-1)
        extents.append((width / cell_w, height / cell_h))
        visible = pixels[..., 3] > 0.5
        monochrome.append(bool(visible.any()) and float(pixels[..., :3][visible].std(axis=0).max()) < 0.08)
    return WatermarkPool(atlas=torch.from_numpy(atlas).permute(2, 0, 1).contiguous(),
                         extents=torch.tensor(extents, dtype=torch.float32),
                         monochrome=torch.tensor(monochrome, dtype=torch.bool),
                         names=[name for name, _ in marks], columns=columns, cell_size=cell_size)
