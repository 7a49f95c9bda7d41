"""Another colour: strong brightness, contrast and saturation changes, and hue turns that recolour the item.

"The same item in another colour" is one of the failure cases: a listing of the red variant must match
the blue one. Every change here is one per-sample 3 x 3 colour matrix plus an offset (in YIQ space a
hue turn is a rotation of the chroma plane and saturation its scale), so the whole augmentation is a
single batched matrix product however many factors it combines.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from kornia.augmentation import IntensityAugmentationBase2D

from ecomaug.augmentation.sampling import (RandomSource, SeededAugmentation, SeededGenerator,
                                           check_probability, check_range)

_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


class ColourShiftGenerator(SeededGenerator):
    """Draws brightness, contrast, saturation and hue (in turns) per sample, and which samples recolour.

    A recoloured sample's hue turns by ``recolour_turn`` or its negative (at least 0.15 turn by default:
    clearly another colour); the others turn by a small amount from ``hue``.
    """

    def __init__(self, brightness: tuple[float, float], contrast: tuple[float, float],
                 saturation: tuple[float, float], hue: tuple[float, float], recolour_p: float,
                 recolour_turn: tuple[float, float], source: RandomSource | None = None) -> None:
        super().__init__(source)
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.recolour_p, self.recolour_turn = recolour_p, recolour_turn

    def forward(self, batch_shape: tuple[int, ...], same_on_batch: bool = False) -> dict[str, torch.Tensor]:
        batch_size = batch_shape[0]
        recolour = self.source.bernoulli((1 if same_on_batch else batch_size,), self.recolour_p, self.device)
        recolour = recolour.expand(batch_size)
        turn = self.draw(batch_size, same_on_batch, self.recolour_turn)
        sign = torch.where(self.draw(batch_size, same_on_batch, (0.0, 1.0)) < 0.5, -1.0, 1.0)
        hue = torch.where(recolour, sign * turn, self.draw(batch_size, same_on_batch, self.hue))
        return {"brightness": self.draw(batch_size, same_on_batch, self.brightness),
                "contrast": self.draw(batch_size, same_on_batch, self.contrast),
                "saturation": self.draw(batch_size, same_on_batch, self.saturation),
                "hue": hue, "recolour": recolour}


class ColourShift(SeededAugmentation, IntensityAugmentationBase2D):
    """Brightness (scales value), contrast, saturation and hue variation, with recolouring hue turns.

    Args:
        brightness: range of the factor every channel is multiplied by (the V of HSV).
        contrast: range of the factor by which the distance from the mean luminance is scaled.
        saturation: range of the chroma scale (0 = grey, 1 = unchanged).
        hue: range of the small hue turn (in turns, -0.5..0.5) of samples that are not recoloured.
        recolour_p: probability that a transformed sample's hue turns by ``recolour_turn`` instead.
        recolour_turn: range of the recolouring hue turn's size (0..0.5 turn, either direction).
        p: probability that a sample is transformed at all.
        source: where the random numbers come from (seeded); a fresh unseeded one if ``None``.

    Shape:
        - Input: :math:`(B, 3, H, W)` float in [0, 1].
        - Output: :math:`(B, 3, H, W)` in [0, 1].
    """

    def __init__(self, brightness: tuple[float, float] = (0.5, 1.5), contrast: tuple[float, float] = (0.5, 1.5),
                 saturation: tuple[float, float] = (0.2, 1.8), hue: tuple[float, float] = (-0.1, 0.1),
                 recolour_p: float = 0.3, recolour_turn: tuple[float, float] = (0.15, 0.5), p: float = 0.8,
                 same_on_batch: bool = False, source: RandomSource | None = None) -> None:
        super().__init__(p=check_probability("p", p), same_on_batch=same_on_batch)
        self._param_generator = ColourShiftGenerator(
            check_range("brightness", brightness, low=0.0), check_range("contrast", contrast, low=0.0),
            check_range("saturation", saturation, low=0.0), check_range("hue", hue, low=-0.5, high=0.5),
            check_probability("recolour_p", recolour_p),
            check_range("recolour_turn", recolour_turn, low=0.0, high=0.5), source)

    def apply_transform(self, input: torch.Tensor, params: dict[str, torch.Tensor], flags: dict[str, Any],
                        transform: torch.Tensor | None = None) -> torch.Tensor:
        matrix, offset = colour_matrix(params, input)
        out = torch.einsum("bij,bjhw->bihw", matrix, input) + offset
        return out.clamp_(0.0, 1.0)


def colour_matrix(params: dict[str, torch.Tensor], images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample ``(B, 3, 3)`` matrix and ``(B, 3, 1, 1)`` offset that apply ``params`` to ``images``.

    ``out = brightness * (contrast * M x + (1 - contrast) * mean_luma(x))`` where ``M`` rotates the YIQ
    chroma plane by the hue turn and scales it by the saturation; ``M`` keeps luma, so the contrast
    pivot is the input's mean luma.
    """
    device, dtype = images.device, images.dtype
    brightness, contrast, saturation, hue = (params[k].to(device, dtype)
                                             for k in ("brightness", "contrast", "saturation", "hue"))
    angle = 2 * math.pi * hue
    cos, sin = torch.cos(angle) * saturation, torch.sin(angle) * saturation
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    chroma = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, cos, -sin], -1),
                          torch.stack([zero, sin, cos], -1)], -2)  # (B, 3, 3) in YIQ
    to_yiq, to_rgb = _RGB_TO_YIQ.to(device, dtype), _YIQ_TO_RGB.to(device, dtype)
    matrix = (brightness * contrast)[:, None, None] * (to_rgb @ chroma @ to_yiq)
    mean_luma = images.mean(dim=(-2, -1)) @ to_yiq[0]  # (B,)
    offset = (brightness * (1 - contrast) * mean_luma)[:, None, None, None].expand(-1, 3, 1, 1)
    return matrix, offset
