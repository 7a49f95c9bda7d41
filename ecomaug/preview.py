"""A picture of what the model trains on: images next to their two augmented views, labelled.

Each row shows one image (as the loader crops it) and two views drawn by a recipe; under each view
are the names of the augmentations that fired on it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ecomaug.recipe_config import RecipeSpec, resolve_recipe
from ecomaug.recipes import AugmentationRecipe, build_recipe_from_spec

_LABEL_HEIGHT = 46


def images_from_folder(folder: str | Path, count: int, *, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``count`` images picked with ``seed`` from ``folder`` (searched recursively), centre-cropped to ``size``.

    Files are chosen by content and read as the shard conversion reads them
    (:func:`loaders.convert.hygiene.read_image`: EXIF orientation, alpha on white, CMYK to RGB), so a
    folder previews as its shards would.

    Shape:
        - returns :math:`(N, 3, S, S)` uint8, ``N = min(count, readable images found)``.
    """
    from loaders.convert.hygiene import read_image
    from loaders.convert.inputs import list_image_files

    paths = list_image_files(folder)
    if not paths:
        raise ValueError(f"no images under {folder} (files are recognised by content)")
    order = random.Random(seed).sample(paths, len(paths))
    crops = []
    for path in order:
        if len(crops) == count:
            break
        try:
            image = read_image(path.read_bytes(), min_side=size)
        except (OSError, ValueError):  # unreadable or corrupt: the conversion would skip it too
            continue
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        crops.append(np.asarray(image.crop((left, top, left + size, top + size))))
    if not crops:
        raise ValueError(f"none of the {len(paths)} images under {folder} could be read")
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def images_from_shards(shards: str | Path, count: int, *, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``count`` images picked with ``seed`` across the shards, whole (square crops of full area), uint8 on CPU."""
    from loaders.build import build_loader

    # Train mode for its seeded shard permutation and shuffle buffer (a pick across the whole set,
    # not the first shard's first items); scale and ratio 1 keep each image whole.
    loader = build_loader(str(shards), backend="torch", device="cpu", batch_size=count, views=1, crop_size=size,
                          scale=(1.0, 1.0), ratio=(1.0, 1.0), seed=seed, mode="train", shuffle_buffer=4096,
                          num_workers=0, drop_last=False)
    for batch in loader:
        return batch.views[0]
    raise ValueError(f"no samples in {shards}")


def draw_preview(images: torch.Tensor, recipe: AugmentationRecipe, *, views: int = 2) -> Image.Image:
    """Run ``recipe`` ``views`` times on ``images`` and lay out originals and views with their labels.

    Args:
        images: :math:`(N, 3, S, S)` uint8 or [0, 1] float, on any device.
        recipe: the augmentation recipe (see :func:`ecomaug.build_recipe`).
        views: augmented views per image.

    Returns:
        The grid: one row per image, columns ``input | view 1 | view 2 ...``.
    """
    columns: list[tuple[torch.Tensor, list[str]]] = [
        (images.float() / 255 if images.dtype == torch.uint8 else images.float(), ["input"] * len(images))]
    for index in range(views):
        view = recipe(images)
        labels = [", ".join(name for name, fired in recipe.last_fired.items() if bool(fired[row])) or "(none)"
                  for row in range(len(images))]
        columns.append((view, [f"view {index + 1}: {text}" for text in labels]))
    rows, size = len(images), images.shape[-1]
    cell_w, cell_h, pad = size, images.shape[-2] + _LABEL_HEIGHT, 4
    grid = Image.new("RGB", (len(columns) * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), (60, 60, 60))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=11)
    for column, (pixels, labels) in enumerate(columns):
        array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for row in range(rows):
            left, top = pad + column * (cell_w + pad), pad + row * (cell_h + pad)
            grid.paste(Image.fromarray(array[row]), (left, top))
            for line, text in enumerate(_wrap(labels[row], font, cell_w - 4)[:3]):
                draw.text((left + 2, top + images.shape[-2] + 3 + 14 * line), text, font=font, fill=(255, 255, 255))
    return grid


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split(" "):
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def make_preview(out: str | Path, *, recipe: str = "ecom", shards: str | Path | None = None,
                 images: str | Path | None = None, count: int = 8, size: int = 224, seed: int = 0,
                 device: str = "cpu", overrides: dict | None = None, spec: RecipeSpec | None = None) -> Path:
    """Write a preview grid of ``count`` images and two views each to ``out`` (PNG).

    Exactly one of ``shards`` and ``images`` must be given. The views are drawn by ``spec`` (see
    :func:`ecomaug.recipe_config.resolve_recipe`, what ``train.py`` builds from the same flags) or,
    without one, by ``recipe`` with ``overrides``; the seed is the one rank 0 of a training run uses.

    Raises:
        ValueError: both or neither input given, a bad count/size, or a bad recipe option.
    """
    if (shards is None) == (images is None):
        raise ValueError("give exactly one of --shards and --images")
    if count < 1 or size < 16:
        raise ValueError(f"need -n >= 1 and --size >= 16, got {count} and {size}")
    batch = (images_from_shards(shards, count, size=size, seed=seed) if shards is not None
             else images_from_folder(images, count, size=size, seed=seed))
    spec = spec if spec is not None else resolve_recipe(recipe, settings=overrides or {})
    augment = build_recipe_from_spec(spec, seed=seed)
    grid = draw_preview(batch.to(device), augment)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


__all__: Sequence[str] = ["draw_preview", "images_from_folder", "images_from_shards", "make_preview"]
