"""One image to its views: where the crops are cut (random resized, centre) and one decode for all.

The PyTorch backend cuts every training view and eval crop here; :func:`centre_box` is also the
evaluation's crop (:func:`ecomaug.evaluation.embed.prepare`), so both read one definition.
"""

from __future__ import annotations

import io
import math
import random
from typing import Any

import numpy as np
import torch
from PIL import Image

from loaders.crops import resize_crop

Box = tuple[float, float, float, float]  # left, top, width, height in source pixels


def random_resized_box(rng: random.Random, width: int, height: int, scale: tuple[float, float],
                       ratio: tuple[float, float]) -> Box:
    """A random crop box as torchvision's ``RandomResizedCrop.get_params`` draws it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = rng.randint(0, height - crop_height)
            left = rng.randint(0, width - crop_width)
            return left, top, crop_width, crop_height
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_width, crop_height = int(round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def centre_box(width: int, height: int) -> Box:
    """The centred square that "resize shorter side to S, centre crop S" keeps."""
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, side, side


def decode_views(data: bytes, size: int, boxes_for: Any) -> list[np.ndarray]:
    """Decode an image once and cut one ``size`` x ``size`` RGB crop per box.

    Pillow decodes (at the smallest DCT scale that keeps every crop at least ``size`` pixels);
    torch resizes (:func:`loaders.crops.resize_crop`, ~3x faster than Pillow's ``resize``).

    Args:
        data: encoded image bytes.
        size: side of the output crops.
        boxes_for: ``(width, height) -> list of boxes`` in source pixels.

    Returns:
        One uint8 array :math:`(S, S, 3)` per box.
    """
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        boxes = boxes_for(width, height)
        if image.format == "JPEG":
            # DCT scaling (1/2, 1/4, 1/8) is almost free and cuts decode time; keep every crop at
            # least `size` pixels on its short side so no view is upsampled because of it.
            smallest = min(min(box[2], box[3]) for box in boxes)
            if smallest > 2 * size:
                image.draft("RGB", (math.ceil(width * size / smallest), math.ceil(height * size / smallest)))
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        pixels = torch.from_numpy(np.array(rgb))  # H x W x 3, decoded here
    decoded_height, decoded_width = pixels.shape[:2]
    scale_x, scale_y = decoded_width / width, decoded_height / height
    views = []
    for left, top, w, h in boxes:
        x0 = min(max(round(left * scale_x), 0), decoded_width - 1)
        y0 = min(max(round(top * scale_y), 0), decoded_height - 1)
        x1 = min(max(round((left + w) * scale_x), x0 + 1), decoded_width)
        y1 = min(max(round((top + h) * scale_y), y0 + 1), decoded_height)
        views.append(resize_crop(pixels, y0, x0, y1 - y0, x1 - x0, size).permute(1, 2, 0).numpy())
    return views
