"""The remover's view of the mark pool: each mark as a luminance signal and an alpha, ready to match."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from ecomaug.marks import as_mark, load_marks

ALPHA_REMOVE = 0.02  # alpha above this is painted out (faint fringes are visible on flat colour)


@dataclass(frozen=True)
class Mark:
    """One known watermark.

    Attributes:
        name: identifier recorded in the sample's json (the file stem for a directory pool).
        signal: ``H x W`` float32, the mark's luminance minus 128, times its alpha: what the mark
            adds to a mid-grey background at full opacity.
        alpha: ``H x W`` float32 in [0, 1].
    """

    name: str
    signal: np.ndarray
    alpha: np.ndarray

    @classmethod
    def from_image(cls, name: str, image: Image.Image) -> "Mark":
        """Build a mark from a PIL image as it is (an image without alpha is a full opaque rectangle)."""
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3] / 255.0
        luminance = rgba[..., 0] * 0.299 + rgba[..., 1] * 0.587 + rgba[..., 2] * 0.114
        ys, xs = np.nonzero(alpha > ALPHA_REMOVE)
        if len(ys) == 0:
            raise ValueError(f"mark {name!r} is fully transparent; a mark needs visible pixels")
        top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        alpha = np.ascontiguousarray(alpha[top:bottom, left:right])
        signal = np.ascontiguousarray(((luminance - 128.0) * (rgba[..., 3] / 255.0))[top:bottom, left:right])
        if min(alpha.shape) < 8:
            raise ValueError(f"mark {name!r} is {alpha.shape[1]}x{alpha.shape[0]} px after trimming "
                             "transparent borders; marks must be at least 8x8")
        # A shape comes from the alpha (a logo's outline) or from the colours (an opaque JPEG).
        if float(alpha.std()) < 0.01 and float(signal.std()) < 1.0:
            raise ValueError(f"mark {name!r} is one flat colour in a full rectangle; it has no shape to "
                             "match (give it an alpha channel that outlines the logo or text)")
        return cls(name=name, signal=signal, alpha=alpha)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels at scale 1."""
        return self.alpha.shape[1], self.alpha.shape[0]


class MarkPool:
    """The known marks to look for, loaded from a folder by the pool's one loader (:func:`ecomaug.marks.load_marks`)."""

    def __init__(self, marks: Sequence[Mark]):
        if not marks:
            raise ValueError("a mark pool needs at least one mark")
        names = [mark.name for mark in marks]
        if len(set(names)) != len(names):
            raise ValueError(f"mark names must be unique, got {sorted(names)}")
        self.marks = tuple(marks)

    @classmethod
    def from_directory(cls, path: str | Path, *, texts: Sequence[str] = ()) -> "MarkPool":
        """The marks of the folder ``path`` (named by file stem) and ``texts``, read as the overlay reads them.

        A mark without alpha has its plain background keyed out (:func:`ecomaug.marks.as_mark`),
        so the remover looks for the very shapes the training overlay pastes.
        """
        return cls([Mark.from_image(name, image) for name, image in load_marks(path, texts=texts)])

    @classmethod
    def from_images(cls, images: Mapping[str, Image.Image]) -> "MarkPool":
        """Build a pool from in-memory images keyed by name, by the pool's rule (no alpha: background keyed out)."""
        return cls([Mark.from_image(name, as_mark(image)) for name, image in images.items()])

    @property
    def names(self) -> list[str]:
        return [mark.name for mark in self.marks]

    def __len__(self) -> int:
        return len(self.marks)

    def __iter__(self) -> Iterator[Mark]:
        return iter(self.marks)
