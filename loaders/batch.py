"""What every loader backend yields: one batch of views with their keys and metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Batch:
    """A batch of ``len(views)`` independently cropped views of the same images.

    Attributes:
        views: ``views`` uint8 tensors on the loader's device.
        keys: the sample keys, in the batch's order.
        meta: the parsed ``<key>.json`` of each sample (``item_id``, ``region``, ...).

    Shape:
        - each view: :math:`(N, 3, S, S)` uint8, ``S`` = ``crop_size``; the memory layout may be
          contiguous or channels_last (call ``.contiguous()`` where a layout matters).
    """

    views: list[torch.Tensor]
    keys: list[str]
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)
