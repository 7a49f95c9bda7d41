"""The work the pipeline benchmark times: tar reads and decodes, two crops, our loaders and the
baseline as endless streams, the ``ecom`` recipe and the training step.

Tar reads and decodes go through a plain webdataset stream, so they do not depend on any loader
backend; the crops, recipe and train stages stream our loaders as training streams them.
"""

from __future__ import annotations

import io
import math
import os
import random
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch

from bench.streams import pull
from loaders.manifest import ShardSet


def pillow_decode(data: bytes) -> torch.Tensor:
    """Full-size RGB decode with Pillow (libjpeg-turbo), as a :math:`(3, H, W)` uint8 tensor."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        pixels = np.array(image.convert("RGB"))  # H x W x 3, writable (torch warns on read-only)
    return torch.from_numpy(pixels).permute(2, 0, 1)  # 3 x H x W


def _jpeg_bytes(sample: dict[str, Any]) -> bytes:
    return sample["jpg"]


def _decoded_shape(sample: dict[str, Any]) -> tuple[int, ...]:
    # Only the shape leaves the worker: real loaders crop before sending pixels between
    # processes, so shipping whole decoded images would charge decode for a copy nobody makes.
    return tuple(pillow_decode(sample["jpg"]).shape)


def _as_list(items: list[Any]) -> list[Any]:
    return items


def sample_stream(urls: Sequence[str], *, batch_size: int, workers: int, seed: int,
                  decode: bool) -> Iterator[list[Any]]:
    """Endless batches (lists) of JPEG bytes, or of decoded images' shapes, from the shards."""
    import webdataset as wds

    dataset = wds.WebDataset(list(urls), resampled=True, shardshuffle=False, seed=seed)
    dataset = dataset.map(_decoded_shape if decode else _jpeg_bytes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=_as_list, persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(seed))
    return iter(loader)


def collect_jpegs(urls: Sequence[str], count: int, seed: int) -> list[bytes]:
    """The first ``count`` JPEGs of the stream, held in memory for the stages timed alone."""
    stream = sample_stream(urls, batch_size=1, workers=0, seed=seed, decode=False)
    return [next(stream)[0] for _ in range(count)]


def decode_batch(jpegs: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEG bytes to RGB uint8 tensors on ``device``: nvJPEG on CUDA, Pillow on the CPU."""
    if device.type == "cuda":
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:  # a torchvision without image decoding: decode on the CPU instead
            pass
        else:
            data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
            with warnings.catch_warnings():
                # torchvision >= 0.29 announces that decoding moves to torchcodec; it still works.
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return [pillow_decode(jpeg).to(device) for jpeg in jpegs]


def two_crops(images: list[torch.Tensor], crop_size: int, rng: random.Random) -> list[torch.Tensor]:
    """Two random resized crops of every image, stacked into two batches on the images' device.

    Shape:
        - images: each :math:`(3, H_i, W_i)` uint8; output: two :math:`(N, 3, S, S)` uint8.
    """
    from torchvision.transforms.v2.functional import resized_crop

    from loaders.torch_backend import random_resized_box

    views = []
    for _ in range(2):
        crops = []
        for image in images:
            left, top, width, height = random_resized_box(rng, image.shape[-1], image.shape[-2],
                                                          scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
            crops.append(resized_crop(image, top, left, height, width, [crop_size, crop_size], antialias=True))
        views.append(torch.stack(crops))  # N x 3 x S x S
    return views


def repeated(shard_set: ShardSet, samples: int) -> ShardSet:
    """``shard_set`` listed as often as it takes to hold ``samples`` samples (once when it does)."""
    copies = 1
    if shard_set.num_samples:
        copies = max(1, math.ceil(samples / shard_set.num_samples))
    return ShardSet(shards=shard_set.shards * copies, manifests=shard_set.manifests)


def loader_stream(shard_set: ShardSet, *, backend: str, device: torch.device, batch_size: int, crop_size: int,
                  seed: int, workers: int, batches_needed: int, dali_variant: str | None = None,
                  shuffle_buffer: int = 1000) -> tuple[Iterator[Any], str]:
    """Our loader (:func:`loaders.build_loader`) as an endless stream, and the backend it resolved to.

    A small shard set is listed several times over, so that one epoch covers every batch the
    measurements take: the loader's start-up then falls into the first warm-up, as it does
    once per epoch in real training, instead of into every repetition.

    Args:
        backend: what :func:`loaders.choose_backend` resolves (``auto``, ``dali``, ``torch``, ...).
        batches_needed: batches the measurements will pull.
        dali_variant: the DALI graph variant (None: the device's default).
    """
    from loaders.build import build_loader, choose_backend, endless_batches

    shards = repeated(shard_set, (batches_needed + 1) * batch_size)
    resolved = choose_backend(backend, device, shards)
    options = dict(backend=resolved, device=device, batch_size=batch_size, views=2, crop_size=crop_size, seed=seed,
                   num_workers=workers, shuffle_buffer=shuffle_buffer, dali_variant=dali_variant)
    return endless_batches(lambda epoch: build_loader(shards, epoch=epoch, **options)), resolved


def baseline_stream(urls: Sequence[str], *, device: torch.device, batch_size: int, crop_size: int, workers: int,
                    seed: int) -> Iterator[Any]:
    """The baseline loader of :mod:`bench.baseline` as an endless stream of batches on ``device``."""
    from bench.baseline import build_baseline_loader, iterate_baseline

    loader = build_baseline_loader(urls, batch_size=batch_size, crop_size=crop_size, num_workers=workers,
                                   seed=seed)
    return iterate_baseline(loader, device)


def build_ecom_recipe(device: torch.device, seed: int) -> torch.nn.Module:
    """The ``ecom`` recipe, seeded, on ``device``."""
    from ecomaug.recipes import build_recipe

    return build_recipe("ecom", seed=seed).to(device)


def synthetic_views(batch_size: int, crop_size: int, device: torch.device,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two normalised-looking random view batches already on ``device``, channels_last.

    Shape:
        - output: two :math:`(N, 3, S, S)` float.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, 3, crop_size, crop_size)
    view_q, view_k = (torch.randn(shape, generator=generator).to(device).contiguous(memory_format=torch.channels_last)
                      for _ in range(2))
    return view_q, view_k


def engine_step(shards: str | os.PathLike | ShardSet, *, model: str, device: torch.device, batch_size: int,
                crop_size: int, amp: str, seed: int, queue_size: int = 65536,
                recipe: torch.nn.Module | None = None) -> Any:
    """The training engine's step (:class:`ecomaug.engine.TrainStep`) as a run on ``shards`` takes it.

    The run is planned as the trainer plans it (:func:`ecomaug.engine.plan_run`: the LR scaled by
    the batch, the ghost-BN splits, the queue cut for a small dataset), the objective built by
    :func:`ecomaug.engine.build_objective`, channels_last, timm's SGD and its schedule.

    Args:
        shards: the training shards (their counts plan the run).
        model: timm backbone name (``pretrained=False``).
        device: where the objective runs.
        batch_size: images per step.
        crop_size: side of the views.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` (with a gradient scaler).
        seed: seeds the weights and the objective's generators.
        queue_size: MoCo's K asked for.
        recipe: uint8 views -> float views, applied inside the step; None: the step takes views
            as they come (uint8 scaled to [0, 1], float as is) and only normalises them.

    Returns:
        The step: ``step(views)`` takes one optimizer step and returns the objective's output.
    """
    from ecomaug.config import TrainConfig
    from ecomaug.engine import TrainStep, build_objective, plan_run
    from loaders.manifest import load_shard_set

    shard_set = shards if isinstance(shards, ShardSet) else load_shard_set(shards)
    config = TrainConfig(model=model, batch_size=batch_size, crop_size=crop_size, queue_size=queue_size, amp=amp,
                         seed=seed, device=str(device), progress=False)
    plan = plan_run(config, shard_set, data=str(shards), val_data=None, world_size=1)
    # timm initialises weights from the global generator (build_objective seeds it): in a fork, so
    # the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        objective = build_objective(config, queue_size=plan.queue_size, bn_splits=plan.bn_splits)
    objective = objective.to(device, memory_format=torch.channels_last)
    objective.train()
    return TrainStep.from_config(config, objective, device=device, lr=plan.lr, total_steps=plan.total_steps,
                                 steps_per_epoch=plan.steps_per_epoch, recipe=recipe)


def loader_fed_step(stream: Iterator[Any], recipe: torch.nn.Module, step: Any) -> Callable[[], float]:
    """One training step fed by the real loader: pull a batch, augment both views, then the step
    (:func:`engine_step`, built without a recipe) normalises them and steps.

    Returns:
        A callable for :func:`bench.streams.time_batches`: the seconds it waited for the batch.
    """
    def one_batch() -> float:
        batch, waited = pull(stream)
        with torch.no_grad():
            views = [recipe(view) for view in batch.views[:2]]
        step(views)
        return waited

    return one_batch
