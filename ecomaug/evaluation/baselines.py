"""Trivial embedders that a trained model must beat: the image itself, shrunk to a few pixels.

A "tiny image" embedding (Torralba et al. 2008) is the honest floor of item matching: on clean
near-duplicates it is hard to beat, and any learned embedding that does not beat it on disturbed
queries has learned nothing useful for them.
"""

from __future__ import annotations

import torch
from torch import nn

from ecomaug.evaluation.embed import EmbeddingModel


class TinyImage(nn.Module):
    """Normalised pixels -> an ``side`` x ``side`` area-averaged thumbnail, flattened and centred.

    Shape:
        - input: :math:`(N, 3, H, W)`; output: :math:`(N, 3 \\cdot side^2)`.
    """

    def __init__(self, side: int = 16) -> None:
        super().__init__()
        if side < 1:
            raise ValueError(f"the thumbnail side must be >= 1, got {side}")
        self.side = side
        # EmbeddingModel finds its device from the backbone's parameters; this one has no weights.
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        thumbnail = nn.functional.adaptive_avg_pool2d(x, self.side).flatten(1)  # N x 3*side*side
        return thumbnail - thumbnail.mean(dim=1, keepdim=True)  # cosine on contrast, not brightness


def tiny_image_model(*, device: torch.device | str = "cpu", input_size: int = 64,
                     side: int = 16) -> EmbeddingModel:
    """The pixel baseline as an :class:`EmbeddingModel`: centre crop at ``input_size``, then ``side`` px."""
    return EmbeddingModel(backbone=TinyImage(side).to(device).eval(), model_name=f"tiny-image-{side}",
                          input_size=input_size, source=f"pixels:{side}x{side}")
