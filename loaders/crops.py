"""Cut a crop out of a decoded image and resize it to the view size, on the CPU, with torch.

Both backends resize their CPU crops here: torch's antialiased bilinear kernel for uint8 (the
one torchvision's ``RandomResizedCrop`` uses on tensors) is SIMD code and, on channels_last
input, costs ~0.3 ms for a 224-px view from a 512-px photo, against ~1 ms for Pillow's
``resize`` and ~1.4 ms (thread time) for DALI's CPU resize.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

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
