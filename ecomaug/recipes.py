"""Named augmentation recipes: ``mocov2`` (the paper's baseline) and ``ecom`` (all e-commerce augmentations).

``build_recipe(name, **overrides)`` returns one ``nn.Module`` that turns a batch of crops into a
view; call it once per view and each call draws fresh parameters. Every probability and range is a
named override; a recipe file can also reorder or drop stages and add ``module:Class`` ones
(:mod:`ecomaug.recipe_config` resolves it, :func:`build_recipe_from_spec` builds it).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ecomaug.augmentation import (ColourShift, MultiItemMosaic, PerspectiveShift, RandomSource, SeededColorJitter,
                                  SeededGaussianBlur, SeededGrayscale, SeededHorizontalFlip, WatermarkOverlay)
from ecomaug.augmentation.custom import build_custom_stage
from ecomaug.recipe_config import RecipeSpec, resolve_recipe
from ecomaug.recipe_defaults import DEFAULT_ORDER, RECIPES  # noqa: F401 -- re-exported: the tables live there

_COMMON = {"seed": None, "generator": None}


class AugmentationRecipe(nn.Module):
    """A sequence of seeded augmentations that maps a uint8 or [0, 1] float batch to one float32 view.

    Attributes:
        name: the recipe's name.
        options: the resolved options (defaults with overrides applied).
        stages: the augmentations, in order, by name.
        last_fired: after a call, ``{augmentation: BoolTensor(N)}``: which samples each one changed.
        last_params: after a call, each stage's parameters; pass them as ``params=`` to replay the view.
        spec: the resolved :class:`~ecomaug.recipe_config.RecipeSpec` it was built from.

    Shape:
        - Input: :math:`(N, 3, H, W)` uint8, or float in [0, 1] (any memory format, any device).
        - Output: :math:`(N, 3, H, W)` float32 in [0, 1] on the input's device.
    """

    def __init__(self, name: str, stages: dict[str, nn.Module], source: RandomSource,
                 options: dict[str, Any], spec: RecipeSpec | None = None) -> None:
        super().__init__()
        self.name, self.source, self.options, self.spec = name, source, options, spec
        self.stages = nn.ModuleDict(stages)
        self.last_fired: dict[str, torch.Tensor] = {}
        self.last_params: dict[str, dict[str, torch.Tensor]] = {}
        # Running counts of fired samples per stage, kept on the device (read with fired_rates()).
        self._fired_counts: dict[str, torch.Tensor] = {}
        self._samples = 0

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
            out = stage(view, params=None if params is None else params[name])
            if not isinstance(out, torch.Tensor) or out.shape != view.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"stage {name!r} returned {got}, expected a tensor of shape {tuple(view.shape)}")
            view = out
            used[name] = stage._params
            gate = used[name].get("batch_prob", torch.ones(()))  # no gate: a stage that always applies
            fired[name] = torch.as_tensor(gate, device=view.device).reshape(-1) > 0.5
            fired[name] = fired[name].expand(len(view)).clone()
            if "recolour" in used[name]:
                fired["recolour"] = fired[name] & used[name]["recolour"].to(view.device)
        self.last_fired, self.last_params = fired, used
        if params is None:
            for name, mask in fired.items():
                self._fired_counts[name] = self._fired_counts.get(name, 0) + mask.sum()
            self._samples += len(view)
        return view.clamp_(0.0, 1.0)  # blur's float rounding can overshoot 1 by an ulp

    def fired_rates(self, *, reset: bool = True) -> dict[str, float]:
        """The share of samples each stage changed since the last reset (one host sync).

        Args:
            reset: start counting afresh afterwards.

        Returns:
            ``{stage: rate}`` with rates in [0, 1]; ``{}`` when nothing was augmented yet.
        """
        rates = {name: float(count) / self._samples for name, count in self._fired_counts.items()} \
            if self._samples else {}
        if reset:
            self._fired_counts, self._samples = {}, 0
        return rates

    def extra_repr(self) -> str:
        return f"name={self.name!r}, seed={self.source.seed}"


def build_recipe(name: str, **overrides: Any) -> AugmentationRecipe:
    """Build a named augmentation recipe.

    Args:
        name: ``"mocov2"`` (colour jitter, grayscale, blur, flip as in MoCo v2) or ``"ecom"`` (perspective,
            colour with recolouring, multi-item mosaic, watermarks, then the MoCo v2 grayscale/blur/flip).
        **overrides: any option of the recipe (see ``RECIPES[name]`` in :mod:`ecomaug.recipe_defaults`), plus ``seed`` (int) or
            ``generator`` (``torch.Generator``) for reproducible views.

    Returns:
        The recipe module; ``module.last_fired`` tells which augmentations fired per sample.

    Raises:
        ValueError: unknown recipe, unknown option (the message lists the allowed ones) or bad value.

    Example:
        >>> augment = build_recipe("ecom", seed=0, watermark_p=0.5)
        >>> views = [augment(batch) for batch in (torch.zeros(4, 3, 64, 64, dtype=torch.uint8),) * 2]
    """
    seeding = {key: overrides.pop(key) for key in _COMMON if key in overrides}
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; allowed: {', '.join(RECIPES)}")
    unknown = sorted(set(overrides) - set(RECIPES[name]))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for recipe {name!r}; "
                         f"allowed: {', '.join(sorted({**RECIPES[name], **_COMMON}))}")
    return build_recipe_from_spec(resolve_recipe(name, settings=overrides), **seeding)


def build_recipe_from_spec(spec: RecipeSpec, *, seed: int | None = None,
                           generator: torch.Generator | None = None) -> AugmentationRecipe:
    """Build the recipe a :class:`~ecomaug.recipe_config.RecipeSpec` describes (built-in and custom stages).

    Args:
        spec: from :func:`ecomaug.recipe_config.resolve_recipe`.
        seed: seed of the recipe's random source.
        generator: or one ``torch.Generator`` every stage draws from (training passes one, seeded ``seed + rank``).

    Raises:
        ValueError: a bad option value, or a custom stage that cannot be built.
    """
    source = RandomSource(seed=seed, generator=generator)
    builders = _STAGE_BUILDERS
    custom = {stage.name: stage for stage in spec.custom}
    stages: dict[str, nn.Module] = {}
    for name in spec.order:
        if name in custom:
            stages[name] = build_custom_stage(custom[name].target, custom[name].args, source)
        else:
            stages[name] = builders[name](spec.options, source)
    return AugmentationRecipe(spec.name, stages, source, dict(spec.options), spec=spec)


def _watermark(o: dict[str, Any], source: RandomSource) -> nn.Module:
    pool = None
    if o["watermark_dir"] is not None or o["watermark_texts"]:
        from ecomaug.watermark_pool import load_watermark_pool

        # A folder of your own is the whole pool: the bundled marks are not mixed in.
        pool = load_watermark_pool(o["watermark_dir"], texts=list(o["watermark_texts"]),
                                   include_default=o["watermark_dir"] is None)
    return WatermarkOverlay(pool, placements=o["watermark_placements"], scale=o["watermark_scale"],
                            tiled_scale=o["watermark_tiled_scale"], opacity=o["watermark_opacity"],
                            tiled_opacity=o["watermark_tiled_opacity"], p=o["watermark_p"], source=source)


# Each built-in stage from the resolved options and the recipe's source.
_STAGE_BUILDERS: dict[str, Callable[[dict[str, Any], RandomSource], nn.Module]] = {
    "colour_jitter": lambda o, source: SeededColorJitter(o["jitter_brightness"], o["jitter_contrast"],
                                                         o["jitter_saturation"], o["jitter_hue"], p=o["jitter_p"],
                                                         source=source),
    "perspective": lambda o, source: PerspectiveShift(o["perspective_distortion"], o["perspective_degrees"],
                                                      o["perspective_turn_p"], o["perspective_white_p"],
                                                      p=o["perspective_p"], source=source),
    "colour": lambda o, source: ColourShift(o["colour_brightness"], o["colour_contrast"], o["colour_saturation"],
                                            o["colour_hue"], o["colour_recolour_p"], o["colour_recolour_turn"],
                                            p=o["colour_p"], source=source),
    "mosaic": lambda o, source: MultiItemMosaic(o["mosaic_min_items"], o["mosaic_max_items"], p=o["mosaic_p"],
                                                source=source),
    "watermark": _watermark,
    "grayscale": lambda o, source: SeededGrayscale(p=o["grayscale_p"], source=source),
    "blur": lambda o, source: SeededGaussianBlur(o["blur_sigma"], p=o["blur_p"], source=source,
                                                 reference_size=o["blur_reference_size"]),
    "flip": lambda o, source: SeededHorizontalFlip(p=o["flip_p"], source=source),
}
