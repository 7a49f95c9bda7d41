"""The built-in recipes' tables: every option of each recipe with its default, and its stages' order.

Data only, so that both :mod:`ecomaug.recipe_config` (which resolves a recipe file against these
defaults) and :mod:`ecomaug.recipes` (which builds the stages) read it without importing each other.
"""

from __future__ import annotations

from typing import Any

# blur_sigma is in pixels of a blur_reference_size crop and scales with the crop (None: absolute pixels).
_MOCO_TAIL: dict[str, Any] = {"grayscale_p": 0.2, "blur_p": 0.5, "blur_sigma": (0.1, 2.0), "blur_reference_size": 224,
                              "flip_p": 0.5}

# Every option of every recipe, with its default.
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
# The stages of each recipe, in the order they run. In ecom, flip comes before the marks and the
# mosaic, so that watermark text never reads mirrored.
DEFAULT_ORDER: dict[str, tuple[str, ...]] = {
    "mocov2": ("colour_jitter", "grayscale", "blur", "flip"),
    "ecom": ("perspective", "flip", "colour", "mosaic", "watermark", "grayscale", "blur"),
}
