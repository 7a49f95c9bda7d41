"""Batched e-commerce augmentations, one Kornia augmentation per file, all drawing from a seeded source.

The path of a view: :class:`PerspectiveShift` (another angle), :class:`ColourShift` (another colour),
:class:`MultiItemMosaic` (several items), :class:`WatermarkOverlay` (shop marks), then the MoCo v2 base
(Kornia's grayscale, blur and flip). :func:`ecomaug.build_recipe` assembles them; a recipe file adds
your own ``module:Class`` stages (:mod:`ecomaug.augmentation.custom` states the contract).
"""

from ecomaug.augmentation.colour import ColourShift
from ecomaug.augmentation.custom import ForkedRandomStage, build_custom_stage, import_stage_class
from ecomaug.augmentation.mocov2 import (SeededColorJitter, SeededGaussianBlur, SeededGrayscale,
                                         SeededHorizontalFlip)
from ecomaug.augmentation.mosaic import MultiItemMosaic
from ecomaug.augmentation.perspective import PerspectiveShift
from ecomaug.augmentation.sampling import RandomSource
from ecomaug.augmentation.watermark import WatermarkOverlay

__all__ = ["ColourShift", "ForkedRandomStage", "MultiItemMosaic", "PerspectiveShift", "RandomSource",
           "SeededColorJitter", "SeededGaussianBlur", "SeededGrayscale", "SeededHorizontalFlip", "WatermarkOverlay",
           "build_custom_stage", "import_stage_class"]
