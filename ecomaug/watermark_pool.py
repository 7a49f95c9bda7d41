"""The watermark atlas: the mark pool (:mod:`ecomaug.marks`) packed into one RGBA texture for the overlay.

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
from PIL import Image

from ecomaug.marks import load_marks

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
    """Load the marks of ``directory`` (the bundled pool if ``None``) and ``texts`` into one atlas.

    The marks are read by :func:`ecomaug.marks.load_marks`, the loader the remover uses too: a
    mark without alpha has its plain background keyed out.

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
    return pack_atlas(load_marks(directory, texts=texts, include_default=include_default)).to(device)


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
