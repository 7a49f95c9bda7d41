"""Several items in one image: replace a view by a canvas of the image itself and up to five other items.

Sellers post collages ("buy 3, get 1 free", a set of mugs) that must still match the single item.
A fired sample becomes a plain-background canvas laid out as a row, a column, a grid or uneven sizes,
holding 1 to 6 items: the sample's own image always, the others drawn from the rest of the batch.
Built on Kornia's ``MixAugmentationBaseV2``, the base Kornia uses for augmentations that read other
samples of the batch (MixUp, CutMix, Mosaic); Kornia's own ``RandomMosaic`` only makes 2 x 2 mosaics
and then crops, which can cut the item itself out.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from kornia.augmentation import MixAugmentationBaseV2

from ecomaug.augmentation.sampling import RandomSource, SeededAugmentation, SeededGenerator, check_probability

MAX_ITEMS = 6
_T = 1 / 3
# Each layout: tiles as (x0, y0, x1, y1) fractions of the canvas. Rows, columns, grids and uneven sizes.
LAYOUTS: dict[str, list[tuple[float, float, float, float]]] = {
    "single": [(0.1, 0.1, 0.9, 0.9)],
    "row2": [(0, 0.25, 0.5, 0.75), (0.5, 0.25, 1, 0.75)],
    "column2": [(0.25, 0, 0.75, 0.5), (0.25, 0.5, 0.75, 1)],
    "big_small2": [(0, 0, 0.68, 1), (0.68, 0.34, 1, 0.66)],
    "row3": [(0, _T, _T, 2 * _T), (_T, _T, 2 * _T, 2 * _T), (2 * _T, _T, 1, 2 * _T)],
    "big_left3": [(0, 0.17, 0.66, 0.83), (0.66, 0.17, 1, 0.5), (0.66, 0.5, 1, 0.83)],
    "grid4": [(0, 0, 0.5, 0.5), (0.5, 0, 1, 0.5), (0, 0.5, 0.5, 1), (0.5, 0.5, 1, 1)],
    "big_top4": [(1 / 6, 0, 5 / 6, 2 * _T), (0, 2 * _T, _T, 1), (_T, 2 * _T, 2 * _T, 1), (2 * _T, 2 * _T, 1, 1)],
    "rows2_3": [(0, 0, 0.5, 0.5), (0.5, 0, 1, 0.5), (0, 0.5, _T, 1), (_T, 0.5, 2 * _T, 1), (2 * _T, 0.5, 1, 1)],
    "grid6": [(i * _T, j * 0.5 + 0.08, (i + 1) * _T, (j + 1) * 0.5 - 0.08) for j in range(2) for i in range(3)],
    "big_corner6": [(0, 0, 2 * _T, 2 * _T), (2 * _T, 0, 1, _T), (2 * _T, _T, 1, 2 * _T), (0, 2 * _T, _T, 1),
                    (_T, 2 * _T, 2 * _T, 1), (2 * _T, 2 * _T, 1, 1)],
}


def _layout_table() -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles ``(L, MAX_ITEMS, 4)`` (zero-padded) and tile counts ``(L,)`` of all layouts, fewest tiles first."""
    ordered = sorted(LAYOUTS.values(), key=len)
    tiles = torch.zeros(len(ordered), MAX_ITEMS, 4)
    for index, layout in enumerate(ordered):
        tiles[index, :len(layout)] = torch.tensor(layout)
    return tiles, torch.tensor([len(layout) for layout in ordered])


class MultiItemMosaicGenerator(SeededGenerator):
    """Draws the item count, the layout, the own image's tile, the other items and the background.

    Returns:
        ``boxes`` (B, 6, 4) where each item goes, as (x0, y0, x1, y1) canvas fractions, aspect kept;
        ``sources`` (B, 6) the batch index drawn in each tile (the sample itself in one of them);
        ``valid`` (B, 6) which tiles are used; ``count`` (B,); ``background`` (B, 3).
    """

    def __init__(self, min_items: int, max_items: int, gap: float, white_p: float,
                 source: RandomSource | None = None) -> None:
        super().__init__(source)
        self.min_items, self.max_items, self.gap, self.white_p = min_items, max_items, gap, white_p
        self.tiles, self.counts = _layout_table()

    def forward(self, batch_shape: tuple[int, ...], same_on_batch: bool = False) -> dict[str, torch.Tensor]:
        batch, device, source = batch_shape[0], self.device, self.source
        tiles, counts = self.tiles.to(device), self.counts.to(device)
        most = max(1, min(self.max_items, batch))  # other items come from the batch: a batch of 1 has none
        least = min(self.min_items, most)
        count = least + source.randint(most - least + 1, (batch,), device)
        # Layouts are sorted by tile count: pick uniformly among those with exactly ``count`` tiles.
        first = torch.searchsorted(counts, count)
        layout = first + source.randint(torch.searchsorted(counts, count, right=True) - first, (batch,), device)
        tile = tiles[layout]  # (B, 6, 4)
        # Fit a canvas-shaped item into each tile, centred, with a gap: both sides scale by the tile's smaller side.
        side = torch.minimum(tile[..., 2] - tile[..., 0], tile[..., 3] - tile[..., 1]) * (1 - self.gap)
        middle = torch.stack([(tile[..., 0] + tile[..., 2]) / 2, (tile[..., 1] + tile[..., 3]) / 2], -1)
        boxes = torch.cat([middle - side[..., None] / 2, middle + side[..., None] / 2], -1)
        slots = torch.arange(MAX_ITEMS, device=device)
        valid = slots[None] < count[:, None]
        own_slot = source.randint(count[:, None], (batch, 1), device)
        # Any other item: an offset of 1..B-1 from the sample's own index never lands on itself.
        others = source.randint(max(batch - 1, 1), (batch, MAX_ITEMS), device) + 1
        index = torch.arange(batch, device=device)[:, None]
        sources = torch.where(slots[None] == own_slot, index, (index + others) % max(batch, 1))
        white = source.bernoulli((batch, 1), self.white_p, device)
        background = torch.where(white, 1.0, source.uniform((batch, 1), (0.8, 0.97), device)
                                 + source.uniform((batch, 3), (-0.03, 0.03), device)).clamp(0, 1)
        return {"boxes": boxes, "sources": sources, "valid": valid, "count": count, "background": background}


class MultiItemMosaic(SeededAugmentation, MixAugmentationBaseV2):
    """With probability ``p``, replace a sample by a canvas of itself and 0-5 other batch items.

    Args:
        min_items: fewest items on a canvas, the sample's own included (1..6).
        max_items: most items on a canvas (min_items..6).
        gap: fraction of each tile left empty around its item.
        white_p: probability of a white canvas; otherwise a light plain colour.
        p: probability that a sample becomes a mosaic.
        source: where the random numbers come from (seeded); a fresh unseeded one if ``None``.

    Shape:
        - Input: :math:`(B, 3, H, W)` float in [0, 1].
        - Output: :math:`(B, 3, H, W)`.
    """

    def __init__(self, min_items: int = 1, max_items: int = MAX_ITEMS, gap: float = 0.06, white_p: float = 0.6,
                 p: float = 0.1, source: RandomSource | None = None) -> None:
        super().__init__(p=check_probability("p", p), p_batch=1.0)
        for name, value in (("min_items", min_items), ("max_items", max_items)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ITEMS:
                raise ValueError(f"{name} must be an int in 1..{MAX_ITEMS}, got {value!r}")
        if min_items > max_items:
            raise ValueError(f"min_items ({min_items}) must not exceed max_items ({max_items})")
        if not 0.0 <= gap < 0.5:
            raise ValueError(f"gap must be in [0, 0.5), got {gap!r}")
        self._param_generator = MultiItemMosaicGenerator(min_items, max_items, float(gap),
                                                         check_probability("white_p", white_p), source)

    def apply_transform(self, input: torch.Tensor, params: dict[str, torch.Tensor],
                        flags: dict[str, Any]) -> torch.Tensor:
        fired = torch.nonzero(params["batch_prob"].to(input.device) > 0.5).squeeze(1)
        if fired.numel() == 0:
            return input
        out = input.clone()
        out[fired] = render_mosaic(input, {k: params[k].to(input.device)[fired]
                                           for k in ("boxes", "sources", "valid", "background")})
        return out


def render_mosaic(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Draw one canvas per row of ``params`` from ``images`` (the whole batch, the items' source).

    Shape:
        - images: :math:`(N, 3, H, W)`; ``params`` rows: :math:`M`; returns :math:`(M, 3, H, W)`.
    """
    height, width = images.shape[-2:]
    device, dtype = images.device, images.dtype
    boxes = params["boxes"].to(dtype)
    rows = len(boxes)
    canvas = params["background"].to(dtype)[:, :, None, None].expand(rows, 3, height, width)
    ys = ((torch.arange(height, device=device, dtype=dtype) + 0.5) / height)[None, :, None]
    xs = ((torch.arange(width, device=device, dtype=dtype) + 0.5) / width)[None, None, :]
    for slot in range(MAX_ITEMS):  # six tiles at most: one batched grid_sample each
        x0, y0, x1, y1 = (boxes[:, slot, i, None, None] for i in range(4))
        u = ((xs - x0) / (x1 - x0) * 2 - 1).expand(rows, height, width)
        v = ((ys - y0) / (y1 - y0) * 2 - 1).expand(rows, height, width)
        inside = (u.abs() <= 1) & (v.abs() <= 1) & params["valid"][:, slot, None, None]
        tile = F.grid_sample(images[params["sources"][:, slot]], torch.stack([u, v], -1), mode="bilinear",
                             padding_mode="border", align_corners=False)
        canvas = torch.where(inside[:, None], tile, canvas)
    return canvas
