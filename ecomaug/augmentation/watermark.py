"""Shop logos and watermarks: blend a mark from a pool onto the image.

Listings carry the seller's logo, a price badge or a tiled "SAMPLE" across the photo; the same item
must embed the same with and without. The pool is one RGBA atlas on the device (see
:mod:`ecomaug.watermark_pool`); every sample gets its own mark, size, position (a corner, the centre,
over the item, or tiled diagonally across the image), opacity and rotation, and all fired samples are
drawn with a single ``grid_sample``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from kornia.augmentation import IntensityAugmentationBase2D

from ecomaug.augmentation.sampling import (RandomSource, SeededAugmentation, SeededGenerator,
                                           check_probability, check_range)
from ecomaug.watermark_pool import WatermarkPool, load_watermark_pool

PLACEMENTS = ("corner", "centre", "over_item", "tiled")
# Colours a one-colour (text) mark may be recoloured to: white, black, grey, red, blue, yellow, green.
_PALETTE = torch.tensor([[1, 1, 1], [0, 0, 0], [0.5, 0.5, 0.5], [0.85, 0.1, 0.1], [0.1, 0.3, 0.8],
                         [0.95, 0.8, 0.1], [0.1, 0.6, 0.3]])
_PER_SAMPLE = ("mark", "centre", "size", "angle", "tiled", "spacing", "opacity", "recolour", "colour")


class WatermarkGenerator(SeededGenerator):
    """Draws per sample: mark, placement, size, rotation, opacity and (for text marks) colour.

    Returns:
        ``mark`` (B,) pool index; ``centre`` (B, 2) mark centre as a fraction of (W, H); ``size`` (B, 2)
        the mark's (width, height) as a fraction of (W, H); ``angle`` (B,) degrees; ``tiled`` (B,) bool;
        ``spacing`` (B,) tile period over mark size; ``opacity`` (B,); ``recolour`` (B,) bool and
        ``colour`` (B, 3) for one-colour marks.
    """

    def __init__(self, pool_aspect: torch.Tensor, monochrome: torch.Tensor, placements: Mapping[str, float],
                 scale: tuple[float, float], tiled_scale: tuple[float, float], opacity: tuple[float, float],
                 tiled_opacity: tuple[float, float], degrees: tuple[float, float],
                 tiled_degrees: tuple[float, float], recolour_p: float, source: RandomSource | None = None) -> None:
        super().__init__(source)
        self.pool_aspect, self.monochrome = pool_aspect, monochrome  # height / width of each mark, (K,)
        self.placement_weights = torch.tensor([float(placements.get(name, 0.0)) for name in PLACEMENTS])
        self.scale, self.tiled_scale, self.opacity, self.tiled_opacity = scale, tiled_scale, opacity, tiled_opacity
        self.degrees, self.tiled_degrees, self.recolour_p = degrees, tiled_degrees, recolour_p

    def forward(self, batch_shape: tuple[int, ...], same_on_batch: bool = False) -> dict[str, torch.Tensor]:
        batch_size, height, width = batch_shape[0], batch_shape[-2], batch_shape[-1]
        n, device, source = (1 if same_on_batch else batch_size), self.device, self.source
        mark = source.randint(len(self.pool_aspect), (n,), device)
        placement = source.choice(self.placement_weights, (n,), device)
        tiled = placement == PLACEMENTS.index("tiled")
        mark_width = torch.where(tiled, source.uniform((n,), self.tiled_scale, device),
                                 source.uniform((n,), self.scale, device))
        mark_height = mark_width * self.pool_aspect.to(device)[mark] * width / height
        shrink = (0.6 / mark_height).clamp(max=1.0)  # very tall marks: keep them within 60 % of the height
        size = torch.stack([mark_width * shrink, mark_height * shrink], -1)
        # Corners: a small margin from the chosen corner's edges. Over the item: the central area
        # where product photos put the product. Tiled: any phase.
        margin = source.uniform((n, 2), (0.02, 0.06), device)
        corner = source.randint(2, (n, 2), device).float()  # (0|1, 0|1): left/right, top/bottom
        corner_centre = margin + size / 2 + corner * (1 - 2 * margin - size)
        centre = torch.where((placement == 0)[:, None], corner_centre,
                             torch.where((placement == 1)[:, None], 0.5 + source.uniform((n, 2), (-0.03, 0.03), device),
                                         source.uniform((n, 2), (0.3, 0.7), device)))
        sign = torch.where(source.bernoulli((n,), 0.5, device), 1.0, -1.0)
        angle = torch.where(tiled, sign * source.uniform((n,), self.tiled_degrees, device),
                            source.uniform((n,), self.degrees, device))
        opacity = torch.where(tiled, source.uniform((n,), self.tiled_opacity, device),
                              source.uniform((n,), self.opacity, device))
        recolour = source.bernoulli((n,), self.recolour_p, device) & self.monochrome.to(device)[mark]
        colour = _PALETTE.to(device)[source.randint(len(_PALETTE), (n,), device)]
        params = {"mark": mark, "centre": centre, "size": size, "angle": angle, "tiled": tiled,
                  "spacing": source.uniform((n,), (1.3, 1.8), device), "opacity": opacity,
                  "recolour": recolour, "colour": colour}
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in params.items()}


class WatermarkOverlay(SeededAugmentation, IntensityAugmentationBase2D):
    """Blend a logo, badge or text mark from a pool onto each sample with probability ``p``.

    Args:
        pool: the marks; the bundled default pool if ``None`` (see ``watermark_dir``).
        watermark_dir: a folder of your own marks (PNG with alpha or JPEG), used instead of the default.
        placements: where marks go: names from ``corner``, ``centre``, ``over_item``, ``tiled`` (equal
            weights) or a mapping of those names to weights.
        scale: range of a placed mark's width as a fraction of the image width.
        tiled_scale: the same for one tile of a tiled mark.
        opacity: range of the blend strength of placed marks.
        tiled_opacity: range of the blend strength of tiled marks.
        degrees: rotation range of placed marks; tiled marks turn by ``tiled_degrees`` either way.
        recolour_p: probability that a one-colour (text) mark is drawn in a palette colour instead.
        p: probability that a sample gets a mark.
        source: where the random numbers come from (seeded); a fresh unseeded one if ``None``.

    Shape:
        - Input: :math:`(B, 3, H, W)` float in [0, 1].
        - Output: :math:`(B, 3, H, W)`; pixels outside the mark are unchanged.
    """

    def __init__(self, pool: WatermarkPool | None = None, *, watermark_dir: str | None = None,
                 placements: Sequence[str] | Mapping[str, float] = (
                     ("corner", 0.4), ("centre", 0.15), ("over_item", 0.25), ("tiled", 0.2)),
                 scale: tuple[float, float] = (0.25, 0.6), tiled_scale: tuple[float, float] = (0.25, 0.45),
                 opacity: tuple[float, float] = (0.5, 0.95), tiled_opacity: tuple[float, float] = (0.2, 0.45),
                 degrees: tuple[float, float] = (-15.0, 15.0), tiled_degrees: tuple[float, float] = (20.0, 45.0),
                 recolour_p: float = 0.5, p: float = 0.3, source: RandomSource | None = None) -> None:
        super().__init__(p=check_probability("p", p))
        if pool is None:
            pool = load_watermark_pool(watermark_dir)
        weights = parse_placements(placements)
        extents = pool.extents * torch.tensor([pool.cell_size[1], pool.cell_size[0]], dtype=torch.float32)
        self.pool = pool
        # One (4, cell_h, cell_w) texture per mark: a sample gathers only its own mark's cell.
        cell_h, cell_w = pool.cell_size
        rows, columns = pool.atlas.shape[1] // cell_h, pool.atlas.shape[2] // cell_w
        cells = pool.atlas.reshape(4, rows, cell_h, columns, cell_w).permute(1, 3, 0, 2, 4)
        self.register_buffer("cells", cells.reshape(rows * columns, 4, cell_h, cell_w)[:len(pool)].contiguous(),
                             persistent=False)
        self.register_buffer("extents", pool.extents, persistent=False)
        self._param_generator = WatermarkGenerator(
            extents[:, 1] / extents[:, 0], pool.monochrome, weights, check_range("scale", scale, low=0.01, high=1),
            check_range("tiled_scale", tiled_scale, low=0.01, high=1), check_range("opacity", opacity, low=0, high=1),
            check_range("tiled_opacity", tiled_opacity, low=0, high=1),
            check_range("degrees", degrees, low=-180, high=180),
            check_range("tiled_degrees", tiled_degrees, low=0, high=90),
            check_probability("recolour_p", recolour_p), source)

    def apply_transform(self, input: torch.Tensor, params: dict[str, torch.Tensor], flags: dict[str, Any],
                        transform: torch.Tensor | None = None) -> torch.Tensor:
        # Draw only the samples that fire: the others are returned untouched by the gate anyway.
        fired = torch.nonzero(params["batch_prob"].to(input.device) > 0.5).squeeze(1)
        if fired.numel() == 0:
            return input
        if self.cells.device != input.device:  # moved once, then kept on the device
            self.cells, self.extents = self.cells.to(input.device), self.extents.to(input.device)
        subset = {k: params[k].to(input.device)[fired] for k in _PER_SAMPLE}
        out = input.clone()
        out[fired] = blend_marks(input[fired], subset, self.cells.to(input.dtype), self.extents)
        return out


def blend_marks(images: torch.Tensor, params: dict[str, torch.Tensor], cells: torch.Tensor,
                extents: torch.Tensor) -> torch.Tensor:
    """Composite one mark per image, as described by ``params`` (see :class:`WatermarkGenerator`).

    Shape:
        - images: :math:`(B, 3, H, W)`; cells: :math:`(K, 4, H_c, W_c)` premultiplied RGBA, each mark
          centred in its cell; extents: :math:`(K, 2)` the marks' (width, height) as fractions of a cell.
    """
    height, width = images.shape[-2:]
    device, dtype = images.device, images.dtype
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
    # Pixel offsets from the mark centre, turned by -angle, in units of the mark's half size.
    centre = params["centre"].to(dtype)
    dx = (xs[None, None, :] - centre[:, 0, None, None]) * width  # (B, 1, W)
    dy = (ys[None, :, None] - centre[:, 1, None, None]) * height  # (B, H, 1)
    angle = torch.deg2rad(params["angle"]).to(dtype)[:, None, None]
    cos, sin = torch.cos(angle), torch.sin(angle)
    u = (cos * dx + sin * dy) / (params["size"][:, 0, None, None] * width / 2)
    v = (-sin * dx + cos * dy) / (params["size"][:, 1, None, None] * height / 2)
    # Tiling: wrap the coordinates into one period; the mark fills the middle 1/spacing of each tile.
    spacing = params["spacing"].to(dtype)[:, None, None]
    tiled = params["tiled"][:, None, None]
    u = torch.where(tiled, torch.remainder(u + spacing, 2 * spacing) - spacing, u)
    v = torch.where(tiled, torch.remainder(v + spacing, 2 * spacing) - spacing, v)
    inside = ((u.abs() <= 1) & (v.abs() <= 1)).to(dtype)[:, None]
    # Content coordinates -> the mark's centred box in its cell, in grid_sample's [-1, 1] coordinates.
    mark = params["mark"]
    extent = extents[mark].to(dtype)
    grid = torch.stack([u.clamp(-1, 1) * extent[:, 0, None, None], v.clamp(-1, 1) * extent[:, 1, None, None]], -1)
    sampled = F.grid_sample(cells[mark], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    strength = params["opacity"].to(dtype)[:, None, None, None] * inside
    alpha = sampled[:, 3:] * strength
    colour = torch.where(params["recolour"][:, None, None, None],
                         params["colour"].to(dtype)[:, :, None, None] * sampled[:, 3:], sampled[:, :3])
    return (images * (1 - alpha) + colour * strength).clamp_(0.0, 1.0)


def parse_placements(placements: Sequence[str] | Sequence[tuple[str, float]] | Mapping[str, float]) -> dict[str, float]:
    """``placements`` as {name: weight}; a ValueError names an unknown placement or bad weight."""
    if isinstance(placements, str):
        placements = [placements]
    if isinstance(placements, Mapping):
        items = list(placements.items())
    else:
        items = [(entry, 1.0) if isinstance(entry, str) else tuple(entry) for entry in placements]
    weights: dict[str, float] = {}
    for name, weight in items:
        if name not in PLACEMENTS:
            raise ValueError(f"unknown watermark placement {name!r}; allowed: {', '.join(PLACEMENTS)}")
        if not isinstance(weight, (int, float)) or weight < 0 or math.isnan(weight):
            raise ValueError(f"placement weight for {name!r} must be a non-negative number, got {weight!r}")
        weights[name] = float(weight)
    if sum(weights.values()) <= 0:
        raise ValueError(f"placements need at least one positive weight, got {placements!r}")
    return weights
