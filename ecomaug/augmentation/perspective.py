"""Another perspective: a strong perspective warp, a small rotation and optional 90-degree turns.

The same item photographed by another seller is seen from another angle and often turned. The
uncovered border is filled like a product background (white, or the photo's own edge colour), never
black, so the model cannot tell a warped view by its black corners.
"""

from __future__ import annotations

from typing import Any

import torch
from kornia.augmentation import GeometricAugmentationBase2D
from kornia.geometry.transform import get_perspective_transform, get_rotation_matrix2d, warp_perspective

from ecomaug.augmentation.sampling import (RandomSource, SeededAugmentation, SeededGenerator,
                                           check_probability, check_range)

# Direction in which each corner (top-left, top-right, bottom-right, bottom-left) moves inwards.
_INWARD = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])


class PerspectiveShiftGenerator(SeededGenerator):
    """Draws corner displacements, a rotation angle, quarter turns and a fill choice per sample.

    Returns:
        ``start_points``/``end_points`` (B, 4, 2) pixel corners; ``angle`` (B,) degrees, quarter
        turns included; ``fill_white`` (B,) bool: white border, else the image's edge colour.
    """

    def __init__(self, distortion: float, degrees: tuple[float, float], turn_p: float, white_p: float,
                 source: RandomSource | None = None) -> None:
        super().__init__(source)
        self.distortion, self.degrees, self.turn_p, self.white_p = distortion, degrees, turn_p, white_p

    def forward(self, batch_shape: tuple[int, ...], same_on_batch: bool = False) -> dict[str, torch.Tensor]:
        batch_size, height, width = batch_shape[0], batch_shape[-2], batch_shape[-1]
        draws = 1 if same_on_batch else batch_size
        corners = torch.tensor([[0.0, 0.0], [width - 1.0, 0.0], [width - 1.0, height - 1.0], [0.0, height - 1.0]],
                               device=self.device)
        start = corners.expand(batch_size, 4, 2)
        # Like kornia's RandomPerspective: each corner moves inwards by up to distortion * half the side.
        half = torch.tensor([(width - 1) / 2, (height - 1) / 2], device=self.device)
        offset = self.source.rand((draws, 4, 2), self.device) * self.distortion * half * _INWARD.to(self.device)
        end = start + offset.expand(batch_size, 4, 2)
        angle = self.draw(batch_size, same_on_batch, self.degrees)
        turns = self.source.bernoulli((draws,), self.turn_p, self.device).float()
        turns = turns * (1 + self.source.randint(3, (draws,), self.device))  # 90, 180 or 270 degrees
        fill_white = self.source.bernoulli((draws,), self.white_p, self.device)
        return {"start_points": start, "end_points": end, "angle": angle + 90.0 * turns.expand(batch_size),
                "fill_white": fill_white.expand(batch_size)}


class PerspectiveShift(SeededAugmentation, GeometricAugmentationBase2D):
    """Perspective warp + small rotation (+ optional 90-degree turns) with a product-like border.

    Args:
        distortion: how far each corner may move inwards, as a fraction of half the side (0..1).
        degrees: range of the extra rotation in degrees.
        turn_p: probability of an additional 90, 180 or 270 degree turn.
        white_p: probability that the border is white; otherwise it takes the median colour of
            the image's outermost pixels (its background).
        p: probability that a sample is warped at all.
        source: where the random numbers come from (seeded); a fresh unseeded one if ``None``.

    Shape:
        - Input: :math:`(B, 3, H, W)` float in [0, 1].
        - Output: :math:`(B, 3, H, W)`.

    Example:
        >>> aug = PerspectiveShift(p=1.0, source=RandomSource(seed=0))
        >>> images = torch.rand(2, 3, 32, 32)
        >>> torch.equal(aug(images), aug(images, params=aug._params))  # replay the same draw
        True
    """

    def __init__(self, distortion: float = 0.5, degrees: tuple[float, float] = (-15.0, 15.0), turn_p: float = 0.0,
                 white_p: float = 0.5, p: float = 0.5, same_on_batch: bool = False,
                 source: RandomSource | None = None) -> None:
        super().__init__(p=check_probability("p", p), same_on_batch=same_on_batch)
        if not 0.0 <= distortion <= 1.0:
            raise ValueError(f"distortion must be in [0, 1], got {distortion!r}")
        self._param_generator = PerspectiveShiftGenerator(
            float(distortion), check_range("degrees", degrees, low=-180, high=180),
            check_probability("turn_p", turn_p), check_probability("white_p", white_p), source)
        self.flags = {"align_corners": True}

    def compute_transformation(self, input: torch.Tensor, params: dict[str, torch.Tensor],
                               flags: dict[str, Any]) -> torch.Tensor:
        start = params["start_points"].to(input.device, input.dtype)
        end = params["end_points"].to(input.device, input.dtype)
        perspective = get_perspective_transform(start, end)  # (B, 3, 3)
        height, width = input.shape[-2:]
        centre = torch.tensor([[(width - 1) / 2, (height - 1) / 2]], device=input.device, dtype=input.dtype)
        centre = centre.expand(len(start), 2)
        rotation = torch.eye(3, device=input.device, dtype=input.dtype).repeat(len(start), 1, 1)
        rotation[:, :2] = get_rotation_matrix2d(centre, params["angle"].to(input.device, input.dtype),
                                                torch.ones_like(centre))
        return rotation @ perspective

    def apply_transform(self, input: torch.Tensor, params: dict[str, torch.Tensor], flags: dict[str, Any],
                        transform: torch.Tensor | None = None) -> torch.Tensor:
        if transform is None:
            transform = self.compute_transformation(input, params, flags)
        height, width = input.shape[-2:]
        # Warp an all-ones alpha channel with the image: where it falls below 1 the border shows through,
        # and compositing over the fill colour there keeps edges anti-aliased instead of black.
        rgba = torch.cat([input, torch.ones_like(input[:, :1])], dim=1)
        warped = warp_perspective(rgba, transform.to(input.dtype), (height, width), mode="bilinear",
                                  padding_mode="zeros", align_corners=flags["align_corners"])
        fill = torch.where(params["fill_white"].to(input.device).view(-1, 1, 1, 1),
                           torch.ones((), device=input.device, dtype=input.dtype), edge_colour(input))
        return (warped[:, :3] + (1.0 - warped[:, 3:]) * fill).clamp_(0.0, 1.0)


def edge_colour(images: torch.Tensor) -> torch.Tensor:
    """The per-channel median of each image's outermost pixels: its background colour.

    Shape:
        - images: :math:`(B, C, H, W)`; returns :math:`(B, C, 1, 1)`.
    """
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    return border.median(dim=-1).values[..., None, None]
