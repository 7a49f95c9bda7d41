"""The baselines a trained model must beat: the image itself shrunk to a few pixels, and which
random-init and frozen pretrained backbones ``ecomaug eval`` adds by default.

A "tiny image" embedding (Torralba et al. 2008) is the honest floor of item matching: on clean
near-duplicates it is hard to beat, and any learned embedding that does not beat it on disturbed
queries has learned nothing useful for them.
"""

from __future__ import annotations

from typing import Sequence

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


def default_baselines(architectures: Sequence[str], *, named_pretrained: Sequence[str] = (),
                      named_random_init: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """The baselines ``ecomaug eval`` adds by default for the ``--model`` architectures: what a
    trained model must beat on the same report.

    Args:
        architectures: the timm names of the ``--model`` backbones, in order.
        named_pretrained: the ``--pretrained`` names given (not added twice).
        named_random_init: the ``--random-init`` names given (not added twice).

    Returns:
        ``(pretrained, random_init)``: the frozen pretrained baseline of each architecture whose
        weights can be had offline (:func:`ecomaug.pretrained.available_offline`; the hub is not
        asked), and the random-init baseline of each.
    """
    from ecomaug.pretrained import available_offline

    unique = list(dict.fromkeys(architectures))
    pretrained = [name for name in unique if name not in named_pretrained and available_offline(name)]
    return pretrained, [name for name in unique if name not in named_random_init]
