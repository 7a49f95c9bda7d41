"""Named augmentation recipes: ``mocov2`` (the paper's baseline) and ``ecom`` (all e-commerce augmentations).

``build_recipe(name, **overrides)`` returns one ``nn.Module`` that turns a batch of crops into a
view; call it once per view and each call draws fresh parameters. Every probability and range is a
named override, so a config file can change any of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ecomaug.augmentation.sampling import check_probability
from ecomaug.augmentation import (ColourShift, MultiItemMosaic, PerspectiveShift, RandomSource, SeededColorJitter,
                                  SeededGaussianBlur, SeededGrayscale, SeededHorizontalFlip, WatermarkOverlay)

# blur_sigma is in pixels of a blur_reference_size crop and scales with the crop (None: absolute pixels).
_MOCO_TAIL: dict[str, Any] = {"grayscale_p": 0.2, "blur_p": 0.5, "blur_sigma": (0.1, 2.0), "blur_reference_size": 224,
                              "flip_p": 0.5}

# Every option of every recipe, with its default. Stages run in the order they appear.
RECIPES: dict[str, dict[str, Any]] = {
    "mocov2": {"jitter_p": 0.8, "jitter_brightness": 0.4, "jitter_contrast": 0.4, "jitter_saturation": 0.4,
               "jitter_hue": 0.1, **_MOCO_TAIL},
    "ecom": {
        "perspective_p": 0.5, "perspective_distortion": 0.5, "perspective_degrees": (-15.0, 15.0),
        "perspective_turn_p": 0.1, "perspective_white_p": 0.5,
        "colour_p": 0.8, "colour_brightness": (0.5, 1.5), "colour_contrast": (0.5, 1.5),
        "colour_saturation": (0.2, 1.8), "colour_hue": (-0.1, 0.1), "colour_recolour_p": 0.3,
        "colour_recolour_turn": (0.15, 0.5),
        "mosaic_p": 0.1, "mosaic_min_items": 1, "mosaic_max_items": 6,
        "watermark_p": 0.3, "watermark_dir": None, "watermark_texts": (), "watermark_scale": (0.25, 0.6),
        "watermark_tiled_scale": (0.25, 0.45), "watermark_opacity": (0.5, 0.95),
        "watermark_tiled_opacity": (0.2, 0.45),
        "watermark_placements": {"corner": 0.4, "centre": 0.15, "over_item": 0.25, "tiled": 0.2},
        **_MOCO_TAIL},
}
_COMMON = {"seed": None, "generator": None}


class AugmentationRecipe(nn.Module):
    """A sequence of seeded augmentations that maps a uint8 or [0, 1] float batch to one float32 view.

    Attributes:
        name: the recipe's name.
        options: the resolved options (defaults with overrides applied).
        stages: the augmentations, in order, by name.
        last_fired: after a call, ``{augmentation: BoolTensor(N)}``: which samples each one changed.
        last_params: after a call, each stage's parameters; pass them as ``params=`` to replay the view.

    Shape:
        - Input: :math:`(N, 3, H, W)` uint8, or float in [0, 1] (any memory format, any device).
        - Output: :math:`(N, 3, H, W)` float32 in [0, 1] on the input's device.
    """

    def __init__(self, name: str, stages: dict[str, nn.Module], source: RandomSource,
                 options: dict[str, Any]) -> None:
        super().__init__()
        self.name, self.source, self.options = name, source, options
        self.stages = nn.ModuleDict(stages)
        self.last_fired: dict[str, torch.Tensor] = {}
        self.last_params: dict[str, dict[str, torch.Tensor]] = {}

    def forward(self, images: torch.Tensor, params: dict[str, dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected an N x 3 x H x W tensor, got {shape}")
        if images.dtype == torch.uint8:
            view = images.to(torch.float32).div_(255.0)
        elif images.is_floating_point():
            view = images.to(torch.float32)
        else:
            raise TypeError(f"expected uint8 or float images, got {images.dtype}")
        fired: dict[str, torch.Tensor] = {}
        used: dict[str, dict[str, torch.Tensor]] = {}
        for name, stage in self.stages.items():
            view = stage(view, params=None if params is None else params[name])
            used[name] = stage._params
            fired[name] = torch.as_tensor(used[name]["batch_prob"], device=view.device).reshape(-1) > 0.5
            fired[name] = fired[name].expand(len(view)).clone()
            if "recolour" in used[name]:
                fired["recolour"] = fired[name] & used[name]["recolour"].to(view.device)
        self.last_fired, self.last_params = fired, used
        return view.clamp_(0.0, 1.0)  # blur's float rounding can overshoot 1 by an ulp

    def extra_repr(self) -> str:
        return f"name={self.name!r}, seed={self.source.seed}"


def build_recipe(name: str, **overrides: Any) -> AugmentationRecipe:
    """Build a named augmentation recipe.

    Args:
        name: ``"mocov2"`` (colour jitter, grayscale, blur, flip as in MoCo v2) or ``"ecom"`` (perspective,
            colour with recolouring, multi-item mosaic, watermarks, then the MoCo v2 grayscale/blur/flip).
        **overrides: any option of the recipe (see ``RECIPES[name]``), plus ``seed`` (int) or
            ``generator`` (``torch.Generator``) for reproducible views.

    Returns:
        The recipe module; ``module.last_fired`` tells which augmentations fired per sample.

    Raises:
        ValueError: unknown recipe, unknown option (the message lists the allowed ones) or bad value.

    Example:
        >>> augment = build_recipe("ecom", seed=0, watermark_p=0.5)
        >>> views = [augment(batch) for batch in (torch.zeros(4, 3, 64, 64, dtype=torch.uint8),) * 2]
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; allowed: {', '.join(RECIPES)}")
    allowed = {**RECIPES[name], **_COMMON}
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for recipe {name!r}; "
                         f"allowed: {', '.join(sorted(allowed))}")
    options = {**allowed, **overrides}
    for key, value in options.items():
        if key.endswith("_p"):
            check_probability(key, value)
    source = RandomSource(seed=options["seed"], generator=options["generator"])
    o = options
    stages: dict[str, nn.Module] = {}
    if name == "mocov2":
        stages["colour_jitter"] = SeededColorJitter(o["jitter_brightness"], o["jitter_contrast"],
                                                    o["jitter_saturation"], o["jitter_hue"], p=o["jitter_p"],
                                                    source=source)
    else:
        stages["perspective"] = PerspectiveShift(o["perspective_distortion"], o["perspective_degrees"],
                                                 o["perspective_turn_p"], o["perspective_white_p"],
                                                 p=o["perspective_p"], source=source)
        # Flip before the marks and the mosaic, so that watermark text never reads mirrored.
        stages["flip"] = SeededHorizontalFlip(p=o["flip_p"], source=source)
        stages["colour"] = ColourShift(o["colour_brightness"], o["colour_contrast"], o["colour_saturation"],
                                       o["colour_hue"], o["colour_recolour_p"], o["colour_recolour_turn"],
                                       p=o["colour_p"], source=source)
        stages["mosaic"] = MultiItemMosaic(o["mosaic_min_items"], o["mosaic_max_items"], p=o["mosaic_p"],
                                           source=source)
        pool = None
        if o["watermark_dir"] is not None or o["watermark_texts"]:
            from ecomaug.watermark_pool import load_watermark_pool

            pool = load_watermark_pool(o["watermark_dir"], texts=list(o["watermark_texts"]),
                                       include_default=o["watermark_dir"] is None)
        stages["watermark"] = WatermarkOverlay(
            pool, placements=o["watermark_placements"], scale=o["watermark_scale"],
            tiled_scale=o["watermark_tiled_scale"], opacity=o["watermark_opacity"],
            tiled_opacity=o["watermark_tiled_opacity"], p=o["watermark_p"], source=source)
    stages["grayscale"] = SeededGrayscale(p=o["grayscale_p"], source=source)
    stages["blur"] = SeededGaussianBlur(o["blur_sigma"], p=o["blur_p"], source=source,
                                        reference_size=o["blur_reference_size"])
    if "flip" not in stages:
        stages["flip"] = SeededHorizontalFlip(p=o["flip_p"], source=source)
    return AugmentationRecipe(name, stages, source, options)
