"""The setup phase's parts: the device and process group, the epoch plan, the objective, the views.

Each is a plain function of the config, so ``bench`` and the tests build exactly what a run builds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ecomaug.config import TrainConfig
from ecomaug.moco import MoCo, resolve_queue_size
from ecomaug.presets import CPU_PRESETS, CPU_SECONDS_PER_RESNET50_IMAGE, CPU_SECONDS_PER_STEP, PRESETS
from ecomaug.recipe_config import RecipeSpec
from ecomaug.siamese import Siamese

logger = logging.getLogger(__name__)

# Pixels per step (batch x crop side squared) above which a run on a CPU is warned: 4x the finetune
# preset's 32 x 128 px, which takes ~1.8 s a step on one core.
HEAVY_FOR_CPU = 4 * 32 * 128 ** 2


def setup_distributed(device_name: str) -> torch.device:
    """Join the process group when started by torchrun (NCCL on GPU, gloo on CPU); pick the device.

    Raises:
        ValueError: an unknown device, CUDA asked for where there is none, or no such GPU.
    """
    from ecomaug.evaluation.embed import resolve_device

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_name)  # "auto": CUDA when present, else CPU
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device_name!r}: training runs on cpu, cuda or cuda:N")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device_name}: no {device} here, this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


@dataclass(frozen=True)
class RunPlan:
    """What the data and the world size make of the config: steps, the queue, the scaled LR.

    Attributes:
        data: the training shards (the converted sample when ``--data`` was not given).
        val_data: held-out shards for the kNN monitor, or None.
        num_samples: training samples (the manifest's counts; None when unknown).
        steps_per_epoch: batches per rank in one epoch.
        total_steps: optimizer steps of the whole run (``--max-steps`` included).
        global_batch: images per step over all ranks.
        lr: ``base_lr * global_batch / 256``.
        queue_size: the MoCo queue length actually used (cut for small datasets).
        bn_splits: ghost-BN sub-batches per device asked for.
    """

    data: str | Path
    val_data: str | Path | None
    num_samples: int | None
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    lr: float
    queue_size: int
    bn_splits: int


def plan_run(config: TrainConfig, shard_set, *, data: str | Path, val_data: str | Path | None,
             world_size: int, device: torch.device | None = None) -> RunPlan:
    """Plan the run from the shard set's counts (no loader is built for it).

    A config other than the CPU presets' that runs on a CPU (``device``) and is heavy for one
    (the defaults: ResNet-50, 224 px, batch 256) gets a warning naming the preset that fits.

    Raises:
        ValueError: the data holds less than one batch per rank, counts are unknown, or the
            dataset is too small for a MoCo queue (outside the CPU presets, the message names
            the preset that fits and what it costs).
    """
    from loaders.sharding import epoch_plan

    global_batch = config.batch_size * world_size
    num_samples = shard_set.num_samples
    offers = "" if config.preset in CPU_PRESETS else preset_hint(num_samples, world_size=world_size)
    hint = f"; or start with a preset that fits: {offers}" if offers else ""
    if num_samples is not None and (num_samples // world_size) // config.batch_size == 0:
        raise ValueError(f"{data} holds {num_samples} samples over {world_size} rank(s), fewer than "
                         f"batch_size={config.batch_size} per rank: not one batch; lower --batch-size{hint}")
    # A DALI epoch can be a few batches shorter (its shard check leaves corrupt samples out);
    # the loop then ends that epoch early.
    steps_per_epoch = epoch_plan(shard_set, batch_size=config.batch_size, world_size=world_size,
                                 seed=config.seed).num_batches
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    queue_size = config.queue_size
    if config.objective == "moco" and config.moco_version == "v2":
        try:
            queue_size, message = resolve_queue_size(config.queue_size, num_samples=num_samples,
                                                     global_batch=global_batch)
        except ValueError as error:
            raise ValueError(f"{error}{hint}") from None
        if message:
            logger.info(message)
    heavy = config.batch_size * config.crop_size ** 2 > HEAVY_FOR_CPU
    if device is not None and device.type == "cpu" and offers and heavy:
        logger.warning(f"{cpu_warning(config, total_steps)}; on a CPU, start with a preset that fits: {offers}")
    bn_splits = config.bn_splits or (1 if world_size > 1 else min(4, max(1, config.batch_size // 8)))
    return RunPlan(data=data, val_data=val_data, num_samples=num_samples, steps_per_epoch=steps_per_epoch,
                   total_steps=total_steps, global_batch=global_batch,
                   lr=config.base_lr * global_batch / 256, queue_size=queue_size, bn_splits=bn_splits)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    return f"~{seconds / 60:.0f} min" if seconds < 5400 else f"~{seconds / 3600:.1f} h"


def preset_hint(num_samples: int | None, *, world_size: int = 1) -> str:
    """The CPU presets, ``"--preset finetune (...) or --preset sample (...)"``, with what each costs.

    Each preset comes with its steps on ``num_samples`` training images and their time on one CPU
    core (:data:`ecomaug.presets.CPU_SECONDS_PER_STEP`); a set too small for its batch (the MoCo
    queue needs two) gets the ``--batch-size`` that fits. Empty for fewer than 4 images per rank.
    """
    per_rank = None if num_samples is None else num_samples // world_size
    if per_rank is not None and per_rank < 4:
        return ""
    offers = []
    for name in CPU_PRESETS:
        preset = PRESETS[name]
        batch = preset["batch_size"] if per_rank is None else min(preset["batch_size"], per_rank // 2)
        flags = f"--preset {name}" + (f" --batch-size {batch}" if batch != preset["batch_size"] else "")
        what = f"{'pretrained ' if preset.get('pretrained') else ''}{preset['model']} at {preset['crop_size']} px"
        seconds = CPU_SECONDS_PER_STEP[name] * batch / preset["batch_size"]
        if per_rank is None:
            cost = f"~{seconds:.1f} s a step on one CPU core"
        else:
            steps = preset["epochs"] * (per_rank // batch)
            cost = f"{steps} steps, {_duration(steps * seconds)} at ~{seconds:.1f} s a step on one CPU core"
        offers.append(f"{flags} ({what}, batch {batch}: {cost}{'; the recommended start' if not offers else ''})")
    return " or ".join(offers)


def cpu_warning(config: TrainConfig, total_steps: int) -> str:
    """What ``config`` will cost on a CPU: its steps and, for ResNet-50, their time on one core."""
    scale = config.batch_size * (config.crop_size / 224) ** 2 * CPU_SECONDS_PER_RESNET50_IMAGE
    cost = (f" ({_duration(scale)} a step on one core, {_duration(total_steps * scale)} in all)"
            if config.model == "resnet50" else "")
    return (f"training {config.model} at {config.crop_size} px, batch {config.batch_size}, on a CPU: "
            f"{total_steps} steps{cost}: a GPU recipe")


def build_objective(config: TrainConfig, *, queue_size: int, bn_splits: int) -> MoCo | Siamese:
    """The objective ``config.objective`` names (MoCo v2/v3 or the Siamese baseline), on the CPU.

    timm initialises weights from the global generator: it is seeded with ``config.seed`` on
    every rank (DDP would broadcast rank 0's weights anyway; this makes runs repeatable).
    """
    torch.manual_seed(config.seed)
    objective = _build(config, queue_size=queue_size, bn_splits=bn_splits)
    if config.export_size not in (None, config.crop_size) and getattr(objective.backbone, "pos_embed", None) is not None:
        raise ValueError(f"--export-size {config.export_size}: {config.model} has position embeddings for its "
                         f"{config.crop_size} px crops; export it at --crop-size")
    return objective


def _build(config: TrainConfig, *, queue_size: int, bn_splits: int) -> MoCo | Siamese:
    if config.objective == "siamese":
        return Siamese(config.model, dim=config.dim, hidden_dim=config.hidden_dim, T=config.temperature,
                       bn_splits=bn_splits, img_size=config.crop_size)
    return MoCo(config.model, dim=config.dim, hidden_dim=config.hidden_dim, K=queue_size,
                m=config.momentum, T=config.temperature, version=config.moco_version,
                shuffle_bn=config.shuffle_bn, bn_splits=bn_splits, seed=config.seed, img_size=config.crop_size,
                momentum_schedule=config.momentum_schedule, koleo_weight=config.koleo_weight,
                mask_same_item=config.mask_same_item)


def resolve_views(config: TrainConfig) -> RecipeSpec:
    """The recipe of the run's views: ``--recipe``, ``--recipe-config``, ``--recipe-set`` and ``--watermark-dir``
    resolved as ``ecomaug preview`` resolves them (cheap: loads no marks; imports only the named stages).

    Raises:
        ValueError: a bad recipe file, option, value or custom stage.
    """
    from ecomaug.recipe_config import resolve_recipe

    return resolve_recipe(config.recipe, config_file=config.recipe_config, settings=config.recipe_set,
                          watermark_dir=config.watermark_dir)


def check_recipe_unchanged(config: TrainConfig, spec: RecipeSpec) -> None:
    """``--resume`` continues the recipe recorded in ``OUT/config.json``, unless ``--allow-recipe-change``.

    Raises:
        ValueError: the recipe differs; the message names what changed.
    """
    import json

    from ecomaug.recipe_config import recipe_changes

    recorded = config.out_dir / "config.json"
    if config.resume is None or config.allow_recipe_change or not recorded.is_file():
        return
    saved = json.loads(recorded.read_text(encoding="utf-8")).get("recipe_spec")
    changes = recipe_changes(saved, spec) if saved is not None else []  # None: a run from before specs
    if changes:
        raise ValueError(f"--resume: the recipe differs from the run's ({recorded}): {'; '.join(changes)}; "
                         "add --allow-recipe-change to continue with the new one")


def build_views(config: TrainConfig, *, device: torch.device, rank: int,
                spec: RecipeSpec | None = None) -> tuple[nn.Module, torch.Generator]:
    """The augmentation recipe that makes the two views, and the generator it draws from.

    The generator is seeded ``seed + rank`` so ranks see different views; it is checkpointed.
    ``spec`` is :func:`resolve_views`'s (resolved here when not given).
    """
    from ecomaug.recipes import build_recipe_from_spec

    generator = torch.Generator(device=device).manual_seed(config.seed + rank)
    return build_recipe_from_spec(spec or resolve_views(config), generator=generator), generator
