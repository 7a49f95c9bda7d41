"""Train a MoCo embedding with a timm backbone, on one device or many.

    python train.py                                    # the bundled sample, a few minutes on CPU
    python train.py --data ./shards --out runs/r50 --preset v100x8
    torchrun --nproc_per_node=8 train.py --data ./shards --out runs/r50 --preset h100
    python train.py --data ./shards --out runs/r50 --resume auto   # after a crash

One step, top to bottom: shards -> ``loaders.build_loader`` (uint8 crops on the device) ->
``ecomaug.build_recipe`` (two augmented views) -> ImageNet normalisation -> channels_last ->
``MoCo`` (or the supervised ``Siamese`` baseline) -> loss -> optimizer. Everything configurable
is a field of :class:`ecomaug.config.TrainConfig`; ``ecomaug train`` runs this same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ecomaug.checkpoint import (CHECKPOINT_DIR, find_latest_checkpoint, list_checkpoints, load_checkpoint,
                                rng_state, save_checkpoint, set_rng_state)
from ecomaug.config import TrainConfig, parse_config
from ecomaug.distributed import all_reduce_mean, get_rank, get_world_size, is_distributed
from ecomaug.export import (CONFIG_NAME, IMAGENET_MEAN, IMAGENET_STD, WEIGHTS_NAME, check_model_name,
                            export_backbone)
from ecomaug.moco import MoCo, momentum_at, resolve_queue_size
from ecomaug.siamese import Siamese, item_labels


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint was kept."""


class OutOfMemoryError(RuntimeError):
    """A batch did not fit in the device's (or the host's) memory."""


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError ("can't allocate memory")."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped the run at a step boundary, after saving a checkpoint there."""

    def __init__(self, signal_number: int, step: int, checkpoint: Path | None) -> None:
        self.signal_number, self.step, self.checkpoint = signal_number, step, checkpoint
        name = signal.Signals(signal_number).name
        saved = (f"checkpoint {checkpoint}; continue with --resume auto" if checkpoint is not None
                 else "no step done, nothing to save")
        super().__init__(f"stopped by {name} at step {step}: {saved}")

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended (130, 143)."""
        return 128 + self.signal_number


class TrainingAborted(BaseException):
    """A second stop signal arrived before the first one's checkpoint was written: stop at once.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that no ``except Exception`` swallows it.
    """

    def __init__(self, signal_number: int) -> None:
        self.signal_number = signal_number
        super().__init__(f"aborted by a second {signal.Signals(signal_number).name}: nothing more "
                         f"was saved (the run's earlier checkpoints are intact)")


class StopSignals:
    """SIGTERM/SIGINT set a flag that the loop reads at a step boundary; a second one aborts at once.

    Schedulers send SIGTERM before they preempt a job, so the first signal must not kill the run
    in the middle of a step: the loop saves a checkpoint where it is and stops. Handlers are only
    installed in the main thread, and a signal the parent set to be ignored (SIGINT in a shell's
    background job) stays ignored. Used as a context manager; the old handlers come back on exit.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                previous = signal.getsignal(number)
                if previous is not signal.SIG_IGN:
                    self._previous[number] = previous
                    signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def _handle(self, signal_number: int, frame: Any) -> None:
        if self.received is not None:
            raise TrainingAborted(signal_number)
        self.received = signal_number


@dataclass
class TrainResult:
    """Where a finished run left its outputs."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    export_dir: Path | None
    last_loss: float | None
    held_out: dict[str, Any] | None = None  # closing kNN recall@1, trained vs random init


# ----------------------------------------------------------------------------------------------
# setup


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


def previous_run(run_dir: Path) -> list[str]:
    """What an earlier run left in ``run_dir``: checkpoints, metrics, TensorBoard logs, an export."""
    found = []
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s) up to step {checkpoints[0][0]}")
    if (run_dir / "metrics.jsonl").is_file():
        found.append("metrics.jsonl")
    if any((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        found.append("tensorboard/")
    if (run_dir / "export" / WEIGHTS_NAME).is_file():
        found.append("export/")
    return found


def check_run_dir(config: TrainConfig) -> None:
    """Refuse an ``--out`` that holds a run unless ``--resume`` or ``--overwrite`` says what to do with it.

    Without this a rerun restarted at step 0, overwrote the checkpoints and appended a second run
    to the metrics; ``python train.py`` (``--out runs/sample``) is rerun often.

    Raises:
        NotADirectoryError: ``--out`` is a file.
        FileExistsError: ``--out`` holds a run and neither flag was given.
    """
    run_dir = config.out_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(20, "--out is a file, not a directory", str(run_dir))
    found = previous_run(run_dir) if config.resume is None and not config.overwrite else []
    if found:
        raise FileExistsError(f"{run_dir} already holds a run ({', '.join(found)}): add --resume auto to "
                              f"continue it, or --overwrite to start again from step 0 (deletes its "
                              f"checkpoints, metrics, TensorBoard logs and export)")


def clear_run(run_dir: Path) -> None:
    """``--overwrite``: delete the files an earlier run wrote (only those; shards and other files stay)."""
    for _, path in list_checkpoints(run_dir):
        path.unlink(missing_ok=True)
    for path in [*(run_dir / CHECKPOINT_DIR).glob(".ckpt-*.tmp"),
                 *(run_dir / "tensorboard").glob("events.out.tfevents.*"),
                 run_dir / "metrics.jsonl", run_dir / "export" / WEIGHTS_NAME, run_dir / "export" / CONFIG_NAME]:
        path.unlink(missing_ok=True)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def sample_shards(out_dir: Path, *, progress: bool) -> tuple[Path, Path]:
    """The bundled sample as shards: ``OUT/shards`` to train on, ``OUT/val-shards`` held out.

    One item in four (by its number) is held out, with all of its photos, so the closing
    recall is measured on items the run never trained on. Converted once, by rank 0.
    """
    import csv

    from ecomaug.paths import SAMPLE_MANIFEST

    shards, val_shards = out_dir / "shards", out_dir / "val-shards"
    if get_rank() == 0 and not all((path / "manifest.json").is_file() for path in (shards, val_shards)):
        from loaders.convert import convert_to_shards

        with open(SAMPLE_MANIFEST, newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        out_dir.mkdir(parents=True, exist_ok=True)
        split = {"train": [r for r in rows if not is_held_out(r["item_id"])],
                 "val": [r for r in rows if is_held_out(r["item_id"])]}
        print(f"converting the bundled sample {SAMPLE_MANIFEST} into shards: {len(split['train'])} photos "
              f"to train on ({shards}), {len(split['val'])} of held-out items ({val_shards})")
        for name, target in (("train", shards), ("val", val_shards)):
            listing = out_dir / f"sample-{name}.csv"
            with listing.open("w", newline="", encoding="utf-8") as stream:
                writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows({**row, "path": str(Path(SAMPLE_MANIFEST).parent / row["path"])}
                                 for row in split[name])
            convert_to_shards(listing, target, shard_size=64, workers=1, progress=progress)
    barrier()
    return shards, val_shards


def is_held_out(item_id: str) -> bool:
    """The sample's held-out items: every fourth (``item003``, ``item007``, ...)."""
    digits = "".join(character for character in item_id if character.isdigit())
    return bool(digits) and int(digits) % 4 == 3


class Normalise(torch.nn.Module):
    """Float views in [0, 1] -> ImageNet-normalised, in the memory format the model runs in."""

    def __init__(self, *, channels_last: bool) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)  # N x 3 x S x S


def build_model(config: TrainConfig, *, queue_size: int, bn_splits: int) -> MoCo | Siamese:
    # timm initialises weights from the global generator: seed it identically on every rank
    # (DDP would broadcast rank 0's weights anyway; this makes runs repeatable).
    torch.manual_seed(config.seed)
    if config.objective == "siamese":
        return Siamese(config.model, dim=config.dim, hidden_dim=config.hidden_dim, T=config.temperature,
                       bn_splits=bn_splits, img_size=config.crop_size)
    return MoCo(config.model, dim=config.dim, hidden_dim=config.hidden_dim, K=queue_size,
                m=config.momentum, T=config.temperature, version=config.moco_version,
                shuffle_bn=config.shuffle_bn, bn_splits=bn_splits, seed=config.seed, img_size=config.crop_size)


def parameter_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: equal on all ranks when DDP kept them in step."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class MetricsLog:
    """JSONL metrics (appended, so a resumed run continues the file) and TensorBoard if installed."""

    def __init__(self, run_dir: Path, *, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tensorboard = None

    def write(self, event: str, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **values}
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
        if self.tensorboard is not None and "step" in values:
            for name, value in values.items():
                if isinstance(value, (int, float)) and name != "step":
                    self.tensorboard.add_scalar(f"{event}/{name}", value, values["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


# ----------------------------------------------------------------------------------------------
# kNN monitor


@torch.no_grad()
def knn_recall_at_1(backbone: torch.nn.Module, shards: str | os.PathLike, *, config: TrainConfig,
                    device: torch.device, normalise: Normalise, autocast) -> dict[str, Any]:
    """Leave-one-out item-matching recall@1 of the backbone's pooled features on ``shards``."""
    from ecomaug.evaluation.retrieval import retrieval_metrics
    from loaders.build import build_loader

    loader = build_loader(shards, backend=config.backend, device=device, batch_size=config.batch_size,
                          crop_size=config.crop_size, mode="eval", drop_last=False,
                          num_workers=config.num_workers)
    was_training = backbone.training
    backbone.eval()
    embeddings, items, keys = [], [], []
    try:
        for batch in loader:
            with autocast:
                features = backbone(normalise(batch.views[0].float() / 255.0))  # N x F
            for index, sample in enumerate(batch.meta):
                if sample.get("item_id") not in (None, ""):
                    embeddings.append(features[index].float())
                    items.append(str(sample["item_id"]))
                    keys.append(batch.keys[index])
    finally:
        backbone.train(was_training)
    if len(embeddings) < 2:
        raise ValueError(f"--val-data {shards} has fewer than 2 samples with an item_id")
    stacked = torch.stack(embeddings)  # M x F
    summary = retrieval_metrics(stacked, items, stacked, items, ks=(1,), exclude_same_key=True,
                                query_keys=keys, gallery_keys=keys, compute_map=False)
    return {"recall@1": float(summary["recall@1"]), "num_queries": int(summary["num_queries"])}


def closing_recall(backbone: torch.nn.Module, shards: str | os.PathLike, *, config: TrainConfig,
                   device: torch.device, normalise: Normalise, autocast) -> dict[str, Any]:
    """The run's closing evidence: held-out kNN recall@1 of the trained backbone and of a
    random-init one of the same architecture and input size (seeded with ``config.seed``)."""
    from ecomaug.export import create_backbone

    trained = knn_recall_at_1(backbone, shards, config=config, device=device, normalise=normalise,
                              autocast=autocast)
    with torch.random.fork_rng(devices=[]):  # the caller's generator stream stays untouched
        torch.manual_seed(config.seed)
        baseline = create_backbone(config.model, img_size=config.crop_size).to(device)
    if config.channels_last:
        baseline = baseline.to(memory_format=torch.channels_last)
    random_init = knn_recall_at_1(baseline, shards, config=config, device=device, normalise=normalise,
                                  autocast=autocast)
    return {"trained_recall@1": trained["recall@1"], "random_init_recall@1": random_init["recall@1"],
            "num_queries": trained["num_queries"], "data": str(shards)}


# ----------------------------------------------------------------------------------------------
# the run


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) the training described by ``config``; see the module docstring.

    Raises:
        TrainingInterrupted: SIGTERM/SIGINT stopped the run; it saved a checkpoint at that step.
        TrainingAborted: a second signal arrived before that checkpoint was written.
        OutOfMemoryError: a batch did not fit (the message names the flags to lower).
        FileExistsError: ``--out`` holds a run and neither ``--resume`` nor ``--overwrite`` was given.
    """
    with StopSignals() as stops:
        try:
            return _train(config, stops)
        except RuntimeError as error:
            if not is_out_of_memory(error) or isinstance(error, OutOfMemoryError):
                raise
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise OutOfMemoryError(f"out of memory with --batch-size {config.batch_size} and --crop-size "
                                   f"{config.crop_size} on {config.device}: lower one of them ({detail})") from error


def _train(config: TrainConfig, stops: StopSignals) -> TrainResult:
    from ecomaug.recipes import build_recipe
    from loaders.build import build_loader
    from loaders.manifest import load_shard_set

    device = setup_distributed(config.device)
    rank, world_size = get_rank(), get_world_size()
    is_main = rank == 0
    run_dir = config.out_dir
    # Every input is checked before any work: a typo fails here, in one line, and creates nothing.
    check_run_dir(config)
    check_model_name(config.model)
    shard_set = load_shard_set(config.data) if config.data is not None else None
    if config.val_data is not None:
        load_shard_set(config.val_data)
    resume_from = None if config.resume in (None, "auto") else (Path(config.resume), load_checkpoint(config.resume))

    # -- data ----------------------------------------------------------------------------------
    if config.data is None:
        data, sample_val = sample_shards(run_dir, progress=config.progress and is_main)
    else:
        data, sample_val = config.data, None
    val_data = config.val_data if config.val_data is not None else sample_val
    if shard_set is None:
        shard_set = load_shard_set(data)

    def epoch_loader(epoch: int, start_batch: int = 0):
        return build_loader(shard_set, backend=config.backend, device=device, batch_size=config.batch_size,
                            views=2, crop_size=config.crop_size, seed=config.seed, rank=rank,
                            world_size=world_size, epoch=epoch, start_batch=start_batch,
                            shuffle_buffer=config.shuffle_buffer, num_workers=config.num_workers)

    steps_per_epoch = len(epoch_loader(0))
    global_batch = config.batch_size * world_size
    if steps_per_epoch == 0:
        raise ValueError(f"{data} holds {shard_set.num_samples} samples: not one batch of "
                         f"{config.batch_size} per rank for {world_size} rank(s); lower --batch-size")
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    # -- model, optimizer, schedule -------------------------------------------------------------
    queue_size, queue_message = config.queue_size, None
    if config.objective == "moco" and config.moco_version == "v2":
        queue_size, queue_message = resolve_queue_size(config.queue_size, num_samples=shard_set.num_samples,
                                                       global_batch=global_batch)
    bn_splits = config.bn_splits or (1 if world_size > 1 else min(4, max(1, config.batch_size // 8)))
    model = build_model(config, queue_size=queue_size, bn_splits=bn_splits).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    backbone_prefix = "encoder.backbone." if config.objective == "siamese" else "encoder_q.backbone."
    lr = config.base_lr * global_batch / 256
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(model, opt=config.opt, lr=lr, weight_decay=config.weight_decay,
                                    **({"momentum": config.sgd_momentum} if config.opt in ("sgd", "lars") else {}))
    # The warm-up and the cosine span the steps the run will take, so --max-steps shortens the
    # whole schedule (a cut run still ends at min_lr); timm counts them here in updates.
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps // 2)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=total_steps,
                                       warmup_epochs=warmup_steps, warmup_lr=lr * 1e-3,
                                       min_lr=config.min_lr, step_on_epochs=False, updates_per_epoch=1)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    # Augmentations draw from their own generator, seeded seed + rank so ranks see different views.
    augment_generator = torch.Generator(device=device).manual_seed(config.seed + rank)
    recipe = build_recipe(config.recipe, generator=augment_generator)
    normalise = Normalise(channels_last=config.channels_last).to(device)
    generators = {"augment": augment_generator}
    if getattr(model, "shuffle_generator", None) is not None:
        generators["shuffle"] = model.shuffle_generator

    if is_main:  # the run directory appears only once the run can start
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.overwrite:
            clear_run(run_dir)
        config.save(run_dir / "config.json")
    barrier()

    # -- resume ---------------------------------------------------------------------------------
    step, start_epoch, start_batch = 0, 0, 0
    metrics = MetricsLog(run_dir, enabled=is_main)
    resumed = None
    if config.resume == "auto":
        resumed = find_latest_checkpoint(run_dir)
        if resumed is None and is_main:
            print(f"--resume auto: no checkpoint in {run_dir / 'checkpoints'} yet, starting fresh")
    elif resume_from is not None:
        resumed = resume_from
    if resumed is not None:
        resume_path, state = resumed
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, start_epoch, start_batch = state["step"], state["epoch"], state["batch_in_epoch"]
        rng_states = state["rng"]
        if len(rng_states) == world_size:
            set_rng_state(rng_states[rank], generators)
        else:  # a different world size: fresh but distinct streams per rank
            torch.manual_seed(config.seed + rank + 1000 * step)
            augment_generator.manual_seed(config.seed + rank + 1000 * step)
        queue = getattr(model, "queue", None)
        metrics.write("resume", step=step, epoch=start_epoch, batch_in_epoch=start_batch,
                      checkpoint=str(resume_path),
                      queue_ptr=int(model.queue_ptr) if queue is not None else None,
                      queue_sum=float(queue.double().sum()) if queue is not None else None)
        if is_main:
            print(f"resumed from {resume_path} at step {step} (epoch {start_epoch}, batch {start_batch})")
    else:
        torch.manual_seed(config.seed + rank)  # dropout and the like differ per rank: seed + rank
    scheduler.step_update(num_updates=step)

    if config.compile:
        for encoder in (getattr(model, "encoder_q", None), getattr(model, "encoder_k", None),
                        getattr(model, "encoder", None)):
            if encoder is not None:
                encoder.compile()  # in place: state_dict keys stay the same
    unwrapped = model
    if is_distributed():
        # The queue is identical on every rank by construction (all ranks enqueue the gathered
        # keys), so buffers are not re-broadcast each step.
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False)

    derived = dict(world_size=world_size, global_batch=global_batch, lr=lr, queue_size=queue_size,
                   bn_splits=unwrapped.bn_splits, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                   device=str(device), data=str(data), val_data=str(val_data) if val_data else None)
    if is_main:
        if queue_message:
            print(queue_message)
        metrics.write("start", step=step, **derived)

    last_checkpoint: Path | None = resumed[0] if resumed is not None else None
    last_saved_step = step if resumed is not None else -1

    def save(epoch: int, batch_in_epoch: int) -> None:
        """Checkpoint the position *after* the last step: resuming starts at (epoch, batch_in_epoch)."""
        nonlocal last_checkpoint, last_saved_step
        check_finite()  # never overwrite good weights with NaN ones
        rng_states = [rng_state(generators)]
        if is_distributed():
            rng_states = [None] * world_size
            dist.all_gather_object(rng_states, rng_state(generators))
        if is_main:
            state = {"format": "ecomaug-checkpoint", "format_version": 1, "model": unwrapped.state_dict(),
                     "backbone_prefix": backbone_prefix, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                     "epoch": epoch, "batch_in_epoch": batch_in_epoch, "rng": rng_states,
                     "config": config.to_dict(), "derived": derived}
            last_checkpoint = save_checkpoint(run_dir, step, state, keep_last=config.keep_last)
        last_saved_step = step
        barrier()

    nonfinite = torch.zeros((), device=device)  # set on the device, read at sync points only

    def check_finite() -> None:
        if float(all_reduce_mean(nonfinite)) > 0:
            raise NonFiniteLossError(f"the loss became NaN or infinite at or before step {step}; training "
                                     f"stopped and the last good checkpoint is kept ({last_checkpoint}); "
                                     f"try a lower --base-lr, --clip-grad 1.0 or --amp bf16")

    def stop_requested() -> bool:
        """A stop signal arrived; under DDP all ranks agree, at metric steps (a sync point anyway)."""
        if not is_distributed():
            return stops.received is not None
        if step % config.log_every:
            return False
        return float(all_reduce_mean(torch.tensor(float(stops.received is not None), device=device))) > 0

    def interrupted(epoch: int, batch_in_epoch: int) -> TrainingInterrupted:
        """Save where the loop stands (as the periodic checkpoints do: resuming is exact) and say so."""
        if step > 0 and last_saved_step != step:
            save(epoch, batch_in_epoch)
        number = stops.received or signal.SIGTERM  # a rank that only heard of it from the others
        checkpoint = last_checkpoint if step > 0 else None
        metrics.write("interrupted", step=step, epoch=epoch, batch_in_epoch=batch_in_epoch,
                      signal=signal.Signals(number).name, checkpoint=str(checkpoint) if checkpoint else None)
        metrics.close()
        bar.close()
        return TrainingInterrupted(number, step, checkpoint)

    # -- the loop -------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not (config.progress and is_main),
               unit="step", dynamic_ncols=True)
    last_loss: float | None = None
    loss_sum = torch.zeros((), device=device)
    accuracy_sum = torch.zeros((), device=device)
    window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
    epoch, batch_in_epoch = start_epoch, start_batch
    model.train()
    while step < total_steps and epoch < config.epochs:
        batches = iter(epoch_loader(epoch, batch_in_epoch))
        while step < total_steps and batch_in_epoch < steps_per_epoch:
            if stop_requested():  # the step boundary: the last step is complete, the next not begun
                raise interrupted(epoch, batch_in_epoch)
            wait_start = time.perf_counter()
            batch = next(batches, None)
            window_wait += time.perf_counter() - wait_start
            if batch is None:
                break
            view_q, view_k = (normalise(recipe(view)) for view in batch.views)  # N x 3 x S x S each
            with autocast:
                if config.objective == "siamese":
                    output = model(view_q, view_k, labels=item_labels(batch.meta, device=device))
                else:
                    m = momentum_at(step, total_steps, config.momentum, config.momentum_schedule)
                    output = model(view_q, view_k, m=m)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(output.loss).backward()
            if config.clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(unwrapped.parameters(), config.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            batch_in_epoch += 1
            scheduler.step_update(num_updates=step)
            loss = output.loss.detach()
            nonfinite += (~torch.isfinite(loss)).float()
            loss_sum += torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
            accuracy_sum += output.accuracy.detach().float()
            window_steps += 1
            bar.update(1)

            if step % config.log_every == 0 or step == total_steps:
                check_finite()
                elapsed = time.perf_counter() - window_start
                last_loss = float(all_reduce_mean(loss_sum)) / window_steps
                record = dict(step=step, epoch=epoch, loss=last_loss,
                              accuracy=float(all_reduce_mean(accuracy_sum)) / window_steps,
                              lr=optimizer.param_groups[0]["lr"],
                              images_per_s=window_steps * global_batch / max(elapsed, 1e-9),
                              data_wait=min(window_wait / max(elapsed, 1e-9), 1.0))
                if config.objective == "moco":
                    record["m"] = momentum_at(step, total_steps, config.momentum, config.momentum_schedule)
                metrics.write("train", **record)
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{record['lr']:.2e}",
                                img_s=f"{record['images_per_s']:.0f}", wait=f"{record['data_wait']:.0%}")
                loss_sum.zero_(), accuracy_sum.zero_()
                window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
            if step % config.checkpoint_every == 0 and batch_in_epoch < steps_per_epoch:
                save(epoch, batch_in_epoch)
        if step >= total_steps and batch_in_epoch < steps_per_epoch:
            break  # --max-steps stopped the run inside an epoch; the final save resumes mid-epoch
        epoch, batch_in_epoch = epoch + 1, 0
        save(epoch, 0)
        if val_data is not None and (epoch % config.knn_every == 0 or epoch == config.epochs):
            if is_main:
                result = knn_recall_at_1(unwrapped.backbone, val_data, config=config, device=device,
                                         normalise=normalise, autocast=autocast)
                metrics.write("knn", step=step, epoch=epoch, **result)
                bar.write(f"epoch {epoch}: kNN recall@1 {result['recall@1']:.3f} "
                          f"on {result['num_queries']} queries of {val_data}")
            barrier()
    bar.close()
    if last_saved_step != step:
        save(epoch, batch_in_epoch)

    # -- the end --------------------------------------------------------------------------------
    fingerprints = [parameter_fingerprint(unwrapped)]
    if is_distributed():
        fingerprints = [None] * world_size
        dist.all_gather_object(fingerprints, parameter_fingerprint(unwrapped))
    if len(set(fingerprints)) != 1:
        raise RuntimeError(f"ranks ended with different weights (fingerprints {fingerprints})")
    export_dir = None
    if is_main and config.export:
        export_dir = export_backbone(unwrapped.backbone, run_dir / "export", model_name=config.model,
                                     input_size=config.crop_size)
    held_out = None
    if is_main and val_data is not None:
        held_out = closing_recall(unwrapped.backbone, val_data, config=config, device=device,
                                  normalise=normalise, autocast=autocast)
        metrics.write("held_out", step=step, **held_out)
    metrics.write("end", step=step, epoch=epoch, loss=last_loss, checkpoint=str(last_checkpoint),
                  export=str(export_dir) if export_dir else None, rank_fingerprints=fingerprints)
    metrics.close()
    barrier()
    return TrainResult(run_dir=run_dir, step=step, checkpoint=last_checkpoint, export_dir=export_dir,
                       last_loss=last_loss, held_out=held_out)


def run(argv: Sequence[str] | None = None, *, prog: str | None = None) -> TrainResult:
    """Parse ``argv``, train, and say where the outputs are (the entry of ``ecomaug train`` too)."""
    config = parse_config(argv, prog=prog)
    try:
        result = train(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":
        print(f"trained {result.step} steps; run directory: {result.run_dir}")
        print(f"checkpoint: {result.checkpoint}")
        if result.export_dir is not None:
            print(f"exported backbone: {result.export_dir} (backbone.safetensors, config.json)")
        if result.held_out is not None:
            held_out = result.held_out
            print(f"held-out kNN recall@1 on {held_out['num_queries']} images of items not trained on: "
                  f"trained {held_out['trained_recall@1']:.3f} vs random-init {held_out['random_init_recall@1']:.3f} "
                  f"({held_out['data']})")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python train.py``: errors become one line and exit code 2; SIGTERM/SIGINT exit 143/130."""
    from ecomaug.cli import USER_ERRORS, is_user_error, one_line

    try:
        run(argv)
    except TrainingInterrupted as stop:
        print(stop, file=sys.stderr)
        return stop.exit_code
    except TrainingAborted as abort:
        print(f"Error: {abort}", file=sys.stderr)
        return 128 + abort.signal_number
    except (*USER_ERRORS, OSError, NonFiniteLossError, OutOfMemoryError) as error:
        if not (is_user_error(error) or isinstance(error, (NonFiniteLossError, OutOfMemoryError))):
            raise
        print(f"Error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
