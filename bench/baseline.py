"""The loader a user would write without ecomaug, to compare ours against on the same shards.

webdataset reads the tars, Pillow decodes, torchvision's ``RandomResizedCrop`` cuts two views and
``PILToTensor`` keeps them uint8, and a ``DataLoader`` with one worker per CPU core batches them.
It is written the way the webdataset and torchvision tutorials write it, on purpose: its speed
is what ecomaug's loaders must beat.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch

from loaders.batch import Batch


class TwoCrops:
    """Two independent ``RandomResizedCrop`` views of one PIL image, as uint8 tensors.

    Shape:
        - Output: two tensors :math:`(3, S, S)` uint8.
    """

    def __init__(self, crop_size: int, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        from torchvision import transforms

        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(crop_size, scale=scale, ratio=ratio),
            transforms.PILToTensor(),
        ])

    def __call__(self, sample: tuple) -> tuple[torch.Tensor, torch.Tensor, str]:
        image, key = sample
        return self.transform(image), self.transform(image), key


def default_workers() -> int:
    """One worker per CPU core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def build_baseline_loader(urls: Sequence[str], *, batch_size: int, crop_size: int = 224,
                          num_workers: int | None = None, shuffle_buffer: int = 1000,
                          seed: int = 0) -> torch.utils.data.DataLoader:
    """webdataset + Pillow + torchvision in a ``DataLoader``: an endless stream of batches.

    Args:
        urls: tar shards (paths or URLs webdataset can open).
        batch_size: images per batch.
        crop_size: side of each square view.
        num_workers: DataLoader workers; default one per core.
        shuffle_buffer: samples held for shuffling (before decoding, as the tutorials do).
        seed: seeds the DataLoader's workers (torchvision draws crops from their torch RNG).

    Returns:
        A DataLoader yielding ``(view_a, view_b, keys)`` with views :math:`(N, 3, S, S)` uint8.
    """
    import webdataset as wds

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    workers = default_workers() if num_workers is None else num_workers
    # resampled=True: an endless stream in which every worker has shards, however few there are.
    dataset = (wds.WebDataset(list(urls), resampled=True, shardshuffle=False, seed=seed)
               .shuffle(shuffle_buffer)
               .decode("pil")
               .to_tuple("jpg", "__key__")
               .map(TwoCrops(crop_size)))
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), generator=generator,
                                       persistent_workers=workers > 0)


def iterate_baseline(loader: torch.utils.data.DataLoader, device: torch.device) -> Iterator[Batch]:
    """Yield the baseline's batches as :class:`loaders.Batch` on ``device``, like our loaders do."""
    non_blocking = device.type == "cuda"
    for view_a, view_b, keys in loader:
        yield Batch(views=[view_a.to(device, non_blocking=non_blocking),
                           view_b.to(device, non_blocking=non_blocking)], keys=list(keys))
