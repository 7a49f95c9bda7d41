"""Resize decoded images on the CPU with torch's uint8 antialiased kernels.

Both backends resize their CPU crops here (:func:`resize_crop`): torch's antialiased bilinear
kernel for uint8 (the one torchvision's ``RandomResizedCrop`` uses on tensors) is SIMD code and,
on channels_last input, costs ~0.3 ms for a 224-px view from a 512-px photo, against ~1 ms for
Pillow's ``resize`` and ~1.4 ms (thread time) for DALI's CPU resize. The shard conversion
shrinks whole images here (:func:`resize_image`): torch's antialiased bicubic kernel, Pillow's
``BICUBIC`` filter in quality, costs about what Pillow's bilinear does.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import numpy as np
import torch


def resize_crop(image: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """The ``(top, left, height, width)`` window of an HWC uint8 image, resized to ``size``.

    Args:
        image: :math:`(H, W, 3)` uint8 (any strides, e.g. a view into a decoder's buffer).
        top, left, height, width: the window in pixels, inside the image.
        size: side ``S`` of the square output.

    Returns:
        :math:`(3, S, S)` uint8, channels_last in memory (so ``.permute(1, 2, 0)`` is an HWC
        array without a copy).
    """
    crop = image[top:top + height, left:left + width].permute(2, 0, 1).unsqueeze(0)
    crop = crop.contiguous(memory_format=torch.channels_last)  # the kernel's fast layout
    return torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear",
                                           antialias=True, align_corners=False)[0]


def resize_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """A whole HWC uint8 image resized to ``width`` x ``height`` (antialiased bicubic, as PIL's).

    Args:
        image: :math:`(H, W, 3)` uint8, C-contiguous (e.g. ``np.asarray`` of a Pillow image;
            it may be read-only).
        width, height: the output size.

    Returns:
        :math:`(3, height, width)` uint8 planes, C-contiguous: the layout the kernel writes
        (a transposing copy to HWC would cost a third of the resize; Pillow's
        ``Image.merge`` of the planes costs almost nothing).

    It runs with this process's torch intra-op threads; a pool with a process per core sets
    them to 1 once (switching per call costs more than the resize).
    """
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, C) uint8 array, got {image.dtype} {image.shape}")
    with warnings.catch_warnings():
        # a read-only array (np.asarray of a Pillow image, no copy) is only read here
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        # HWC memory is NCHW channels_last: the kernel's fast layout, without a copy
        pixels = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
    resized = torch.nn.functional.interpolate(pixels, size=(height, width), mode="bicubic",
                                              antialias=True, align_corners=False)
    return resized[0].contiguous().numpy()


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads, then restore the previous number.

    One small crop per call gains nothing from intra-op threads and, beside a loader's other
    threads, loses ~25% to oversubscription. With torch's OpenMP backend the setting is the
    calling thread's own.
    """
    previous = torch.get_num_threads()
    if previous == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
