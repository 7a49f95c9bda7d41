"""The one image normalisation (timm's ImageNet constants) and the evaluation resize it pairs with.

Training (:class:`Normalise` after the recipe), evaluation (:mod:`ecomaug.evaluation.embed`)
and the export's ``config.json`` all read these names, so the three cannot drift apart.
``EVAL_INTERPOLATION`` is what the loaders' eval mode does (shorter side to ``S`` with
antialiased bilinear, centre square: ``loaders.crops.resize_crop`` in the PyTorch backend,
DALI's antialiased linear resize) and what evaluation of single images does too.
"""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)
EVAL_INTERPOLATION = "bilinear"

__all__ = ["EVAL_INTERPOLATION", "IMAGENET_MEAN", "IMAGENET_STD", "Normalise"]


class Normalise(torch.nn.Module):
    """Float images in [0, 1] -> normalised with ``mean``/``std``, in the model's memory format.

    Args:
        channels_last: return ``torch.channels_last`` tensors (the format the model runs in).
        mean: per-channel mean, timm's ImageNet one by default.
        std: per-channel standard deviation, timm's ImageNet one by default.

    Shape:
        - input: :math:`(N, 3, H, W)` float in [0, 1]; output: the same shape.
    """

    def __init__(self, *, channels_last: bool = False, mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return ((x - mean) / std).contiguous(memory_format=self.memory_format)  # N x 3 x H x W
