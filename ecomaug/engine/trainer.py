"""The training engine: ``setup -> step -> checkpoint -> finish``, and :func:`train` over it.

:class:`Trainer` holds one run's state between the phases; ``train.py``, ``ecomaug train``,
``bench`` and the GPU checks all go through it. Nothing here knows which objective it trains:
the objective's own members (:class:`ecomaug.objective.Objective`) say what differs.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ecomaug.checkpoint import find_latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ecomaug.config import TrainConfig
from ecomaug.distributed import (all_reduce_mean, barrier, gather, get_rank, get_world_size, is_distributed,
                                 parameter_fingerprint)
from ecomaug.engine.initial_weights import initial_weights, reread_start, run_normalisation
from ecomaug.engine.errors import NonFiniteLossError, OutOfMemoryError, TrainingInterrupted, is_out_of_memory
from ecomaug.engine.metrics import MetricsLog
from ecomaug.engine.monitor import closing_recall, knn_recall_at_1
from ecomaug.engine.rundir import check_run_dir, clear_run
from ecomaug.engine.sample import sample_shards
from ecomaug.engine.setup import (RunPlan, build_objective, build_views, check_recipe_unchanged, plan_run,
                                  resolve_views, setup_distributed)
from ecomaug.engine.signals import StopSignals
from ecomaug.engine.step import TrainStep

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where a finished run left its outputs."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    export_dir: Path | None
    last_loss: float | None
    held_out: dict[str, Any] | None = None  # closing kNN recall@1, trained vs random init


class Trainer:
    """One run of ``config``: :meth:`setup`, then :meth:`step` per batch (which calls
    :meth:`checkpoint` on schedule), then :meth:`finish`. :meth:`fit` runs them in order.

    Args:
        config: the resolved, frozen configuration.
        stops: the stop-signal flag the loop reads at step boundaries.
    """

    def __init__(self, config: TrainConfig, stops: StopSignals | None = None) -> None:
        self.config, self.stops = config, stops or StopSignals()
        self.run_dir = config.out_dir
        self.epoch = self.batch_in_epoch = 0
        self.last_checkpoint: Path | None = None
        self.last_saved_step = -1
        self.last_loss: float | None = None
        self.bar: Any = None

    # -- setup -----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Check every input, plan the run, build the objective and its step, resume if asked."""
        config = self.config
        self.device = setup_distributed(config.device)
        self.rank, self.world_size = get_rank(), get_world_size()
        self.is_main = self.rank == 0
        shard_set, resume_from = self._check_inputs()
        if config.data is None:
            data, val_data = sample_shards(self.run_dir, progress=config.progress and self.is_main)
            from loaders.manifest import load_shard_set

            shard_set = load_shard_set(data)
        else:
            data, val_data = config.data, None
        self.shard_set = shard_set
        self.plan: RunPlan = plan_run(config, shard_set, data=data, world_size=self.world_size, device=self.device,
                                      val_data=config.val_data if config.val_data is not None else val_data)
        objective = build_objective(config, queue_size=self.plan.queue_size, bn_splits=self.plan.bn_splits)
        # A resumed run takes every weight from its checkpoint: --init / --pretrained are not read again.
        weights = initial_weights(config, objective.backbone) if resume_from is None else None
        # Kept for the closing line's frozen start (load_backbone copies them: training leaves them be).
        self.start_weights = weights
        self.normalisation = run_normalisation(config, resume_from)
        if weights is not None:
            objective.load_backbone(weights)
            logger.info("backbone starts from %s", config.init or f"timm's pretrained {config.model}")
        objective = objective.to(self.device)
        if config.channels_last:
            objective = objective.to(memory_format=torch.channels_last)
        self.objective = objective
        recipe, augment_generator = build_views(config, device=self.device, rank=self.rank, spec=self.recipe_spec)
        self.train_step = TrainStep.from_config(config, objective, device=self.device, lr=self.plan.lr,
                                                total_steps=self.plan.total_steps,
                                                steps_per_epoch=self.plan.steps_per_epoch, recipe=recipe,
                                                normalisation=self.normalisation)
        self.generators = {"augment": augment_generator, **objective.generators()}
        self._prepare_run_dir()
        self.metrics = MetricsLog(self.run_dir, enabled=self.is_main)
        self._resume(resume_from)
        if config.compile:
            for encoder in objective.encoders():
                encoder.compile()  # in place: state_dict keys stay the same
        if is_distributed():
            from torch.nn.parallel import DistributedDataParallel

            # The queue is identical on every rank by construction (all ranks enqueue the gathered
            # keys), so buffers are not re-broadcast each step.
            self.train_step.wrap(DistributedDataParallel(
                objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False))
        plan = self.plan
        self.derived = dict(world_size=self.world_size, global_batch=plan.global_batch, lr=plan.lr,
                            queue_size=plan.queue_size, bn_splits=objective.bn_splits,
                            steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps,
                            device=str(self.device), data=str(plan.data),
                            val_data=str(plan.val_data) if plan.val_data else None,
                            mean=list(self.normalisation["mean"]), std=list(self.normalisation["std"]))
        self.metrics.write("start", step=self.step_count, **self.derived)
        self.nonfinite = torch.zeros((), device=self.device)  # set on the device, read at sync points
        from tqdm.auto import tqdm

        self.bar = tqdm(total=plan.total_steps, initial=self.step_count, unit="step", dynamic_ncols=True,
                        disable=not (config.progress and self.is_main))
        if self.is_main:  # with --no-progress, the only sign of life until the first step line
            self.bar.write(f"training {plan.total_steps} steps of {config.model} at {config.crop_size} px, "
                           f"batch {plan.global_batch}, on {self.device} from step {self.step_count}; "
                           f"records: {self.metrics.path}")
        self._open_window()
        objective.train()

    def _check_inputs(self) -> tuple[Any, tuple[Path, dict[str, Any]] | None]:
        """Every input is checked before any work: a typo fails here, in one line, and creates nothing."""
        from ecomaug.export import check_model_name
        from loaders.manifest import load_shard_set

        config = self.config
        check_run_dir(config)
        check_model_name(config.model)
        shard_set = load_shard_set(config.data) if config.data is not None else None
        if config.val_data is not None:
            load_shard_set(config.val_data)
        self.recipe_spec = resolve_views(config)
        check_recipe_unchanged(config, self.recipe_spec)
        resume_from = None
        if config.resume == "auto":
            resume_from = find_latest_checkpoint(self.run_dir)
            if resume_from is None and self.is_main:
                logger.info("--resume auto: no checkpoint in %s yet, starting fresh", self.run_dir / "checkpoints")
        elif config.resume is not None:
            resume_from = (Path(config.resume), load_checkpoint(config.resume))
        if config.init is not None and resume_from is None and not os.path.exists(config.init):
            raise FileNotFoundError(2, "No such --init file or folder", config.init)
        return shard_set, resume_from

    def _prepare_run_dir(self) -> None:
        if self.is_main:  # the run directory appears only once the run can start
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.config.overwrite:
                clear_run(self.run_dir)
            self.config.save(self.run_dir / "config.json", derived={"recipe_spec": self.recipe_spec.to_dict()})
        barrier()

    def _resume(self, resume_from: tuple[Path, dict[str, Any]] | None) -> None:
        config, log = self.config, logger
        resumed = resume_from
        if resumed is None:
            torch.manual_seed(config.seed + self.rank)  # dropout and the like differ per rank: seed + rank
            return
        path, state = resumed
        self.objective.load_state_dict(state["model"])
        self.train_step.load_state_dict(state)
        step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        if len(state["rng"]) == self.world_size:
            set_rng_state(state["rng"][self.rank], self.generators)
        else:  # a different world size: fresh but distinct streams per rank
            torch.manual_seed(config.seed + self.rank + 1000 * step)
            self.generators["augment"].manual_seed(config.seed + self.rank + 1000 * step)
        self.train_step.start_at(step)
        self.last_checkpoint, self.last_saved_step = path, step
        self.metrics.resume(step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,  # drops later records
                            checkpoint=str(path), **self.objective.summary())
        if self.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", path, step, self.epoch,
                     self.batch_in_epoch)

    @property
    def step_count(self) -> int:
        """Optimizer steps done so far."""
        return self.train_step.step

    # -- step -------------------------------------------------------------------------------------

    def step(self, batch: Any) -> None:
        """One optimizer step on ``batch`` (a :class:`loaders.Batch`), its records and checkpoint."""
        output = self.train_step(batch.views, batch.meta)
        self.batch_in_epoch += 1
        loss = output.loss.detach()
        self.nonfinite += (~torch.isfinite(loss)).float()
        self.window["loss"] += torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
        self.window["accuracy"] += output.accuracy.detach().float()
        self.window["steps"] += 1
        self.bar.update(1)
        step, config = self.step_count, self.config
        if step % config.log_every == 0 or step == self.plan.total_steps:
            self._log_window()
        if step % config.checkpoint_every == 0 and self.batch_in_epoch < self.plan.steps_per_epoch:
            self.checkpoint()

    def _open_window(self) -> None:
        zero = torch.zeros((), device=self.device)
        self.window = {"loss": zero.clone(), "accuracy": zero.clone(), "steps": 0, "wait": 0.0,
                       "start": time.perf_counter()}

    def _log_window(self) -> None:
        self.check_finite()
        window, steps = self.window, self.window["steps"]
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        self.last_loss = float(all_reduce_mean(window["loss"])) / steps
        record = dict(step=self.step_count, epoch=self.epoch, loss=self.last_loss,
                      accuracy=float(all_reduce_mean(window["accuracy"])) / steps,
                      lr=self.train_step.lr,
                      images_per_s=steps * self.plan.global_batch / elapsed,
                      data_wait=min(window["wait"] / elapsed, 1.0), **self.train_step.stats,
                      **self.objective.health())
        if self.train_step.recipe is not None:  # rank 0's share of samples each stage changed in the window
            record["fired"] = {name: round(rate, 4) for name, rate in self.train_step.recipe.fired_rates().items()}
        self.metrics.write("train", **record)
        self.bar.set_postfix(loss=f"{self.last_loss:.3f}", lr=f"{record['lr']:.2e}",
                             img_s=f"{record['images_per_s']:.0f}", wait=f"{record['data_wait']:.0%}")
        if self.is_main and not self.config.progress:  # no bar: a line per --log-every steps instead
            self.bar.write(f"step {self.step_count}/{self.plan.total_steps}: loss {self.last_loss:.3f}, "
                           f"{record['images_per_s']:.1f} images/s")
        self._open_window()

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` when any rank saw a NaN or infinite loss."""
        if float(all_reduce_mean(self.nonfinite)) > 0:
            raise NonFiniteLossError(f"the loss became NaN or infinite at or before step {self.step_count}; "
                                     f"training stopped and the last good checkpoint is kept "
                                     f"({self.last_checkpoint}); try a lower --base-lr, --clip-grad 1.0 "
                                     f"or --amp bf16")

    # -- checkpoint -------------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Save the position *after* the last step: resuming starts at (epoch, batch_in_epoch)."""
        self.check_finite()  # never overwrite good weights with NaN ones
        rng_states = gather(rng_state(self.generators))
        if self.is_main:
            state = {"format": "ecomaug-checkpoint", "format_version": 1, "model": self.objective.state_dict(),
                     "backbone_prefix": self.objective.backbone_prefix, **self.train_step.state_dict(),
                     "step": self.step_count, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                     "rng": rng_states, "config": self.config.to_dict(), "derived": self.derived}
            self.last_checkpoint = save_checkpoint(self.run_dir, self.step_count, state,
                                                   keep_last=self.config.keep_last)
        self.last_saved_step = self.step_count
        barrier()

    def _stop_requested(self, *, anywhere: bool = False) -> bool:
        """A stop signal arrived; under DDP all ranks agree at metric steps (a sync point anyway) or ``anywhere``."""
        return self.stops.requested(self.device, agree=anywhere or self.step_count % self.config.log_every == 0)

    def _interrupted(self) -> TrainingInterrupted:
        """Save where the loop stands (as the periodic checkpoints do: resuming is exact) and say so."""
        step = self.step_count
        if step > 0 and self.last_saved_step != step:
            self.checkpoint()
        number = self.stops.received or signal.SIGTERM  # a rank that only heard of it from the others
        checkpoint = self.last_checkpoint if step > 0 else None
        self.metrics.write("interrupted", step=step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
                           signal=signal.Signals(number).name, checkpoint=str(checkpoint) if checkpoint else None)
        self.metrics.close()
        self.bar.close()
        return TrainingInterrupted(number, step, checkpoint)

    # -- the loop ---------------------------------------------------------------------------------

    def epoch_loader(self) -> Any:
        """The loader of the current epoch on this rank, from the current batch on (resume)."""
        from loaders.build import build_loader

        config = self.config
        return build_loader(self.shard_set, backend=config.backend, device=self.device,
                            batch_size=config.batch_size, views=2, crop_size=config.crop_size,
                            seed=config.seed, rank=self.rank, world_size=self.world_size, epoch=self.epoch,
                            start_batch=self.batch_in_epoch, shuffle_buffer=config.shuffle_buffer,
                            num_workers=config.num_workers)

    def fit(self) -> TrainResult:
        """Run :meth:`setup`, every step, and :meth:`finish`."""
        self.setup()
        config, plan = self.config, self.plan
        while self.step_count < plan.total_steps and self.epoch < config.epochs:
            batches = iter(self.epoch_loader())
            while self.step_count < plan.total_steps and self.batch_in_epoch < plan.steps_per_epoch:
                if self._stop_requested():  # the step boundary: the last step is complete, the next not begun
                    raise self._interrupted()
                wait_start = time.perf_counter()
                batch = next(batches, None)
                self.window["wait"] += time.perf_counter() - wait_start
                if batch is None:
                    break
                self.step(batch)
            if self.step_count >= plan.total_steps and self.batch_in_epoch < plan.steps_per_epoch:
                break  # --max-steps stopped the run inside an epoch; the final save resumes mid-epoch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self.checkpoint()
            self._monitor()
        self.bar.close()
        if self.last_saved_step != self.step_count:
            self.checkpoint()
        return self.finish()

    def _monitor(self) -> None:
        """The kNN recall@1 check on the held-out shards, every ``--knn-every`` epochs."""
        config, val_data = self.config, self.plan.val_data
        if val_data is None or not (self.epoch % config.knn_every == 0 or self.epoch == config.epochs):
            return
        if self.is_main:
            result = knn_recall_at_1(self.objective.backbone, val_data, config=config, device=self.device,
                                     normalise=self.train_step.normalise, autocast=self.train_step.autocast())
            self.metrics.write("knn", step=self.step_count, epoch=self.epoch, **result)
            self.bar.write(f"epoch {self.epoch}: kNN recall@1 {result['recall@1']:.3f} "
                           f"± {result['standard_error']:.3f} on {result['num_queries']} queries of {val_data}")
        barrier()

    # -- finish -----------------------------------------------------------------------------------

    def finish(self) -> TrainResult:
        """Check the ranks agree, export the backbone, measure held-out recall, write the end record."""
        from ecomaug.export import export_backbone, export_sides

        config, backbone = self.config, self.objective.backbone
        if self._stop_requested(anywhere=True):  # a stop during the last steps: the loop no longer looks
            raise self._interrupted()
        fingerprints = gather(parameter_fingerprint(self.objective))
        if len(set(fingerprints)) != 1:
            raise RuntimeError(f"ranks ended with different weights (fingerprints {fingerprints})")
        export_dir = held_out = None
        if self.is_main and config.export:
            size, extra = export_sides(config.crop_size, config.export_size, config.export_multiscale)
            export_dir = export_backbone(backbone, self.run_dir / "export", model_name=config.model,
                                         input_size=size, extra_sizes=extra, **self.normalisation)
        if self._stop_requested(anywhere=True):  # during the export: it is written, the recall can wait
            raise self._interrupted()
        if self.is_main and self.plan.val_data is not None:
            held_out = closing_recall(backbone, self.plan.val_data, config=config, device=self.device,
                                      normalise=self.train_step.normalise, autocast=self.train_step.autocast(),
                                      start_weights=self.start_weights or reread_start(config, backbone))
            self.metrics.write("held_out", step=self.step_count, **held_out)
        if self._stop_requested(anywhere=True):  # during the recall: a stop is honoured up to the last record
            raise self._interrupted()
        self.metrics.write("end", step=self.step_count, epoch=self.epoch, loss=self.last_loss,
                           checkpoint=str(self.last_checkpoint), export=str(export_dir) if export_dir else None,
                           rank_fingerprints=fingerprints)
        self.metrics.close()
        barrier()
        return TrainResult(run_dir=self.run_dir, step=self.step_count, checkpoint=self.last_checkpoint,
                           export_dir=export_dir, last_loss=self.last_loss, held_out=held_out)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) the training described by ``config``.

    Raises:
        TrainingInterrupted: SIGTERM/SIGINT stopped the run; it saved a checkpoint at that step.
        TrainingAborted: a second signal arrived before that checkpoint was written.
        OutOfMemoryError: a batch did not fit (the message names the flags to lower).
        FileExistsError: ``--out`` holds a run and neither ``--resume`` nor ``--overwrite`` was given.
        NonFiniteLossError: the loss became NaN or infinite.
    """
    with StopSignals() as stops:
        try:
            return Trainer(config, stops).fit()
        except RuntimeError as error:
            if not is_out_of_memory(error) or isinstance(error, OutOfMemoryError):
                raise
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise OutOfMemoryError(f"out of memory with --batch-size {config.batch_size} and --crop-size "
                                   f"{config.crop_size} on {config.device}: lower one of them ({detail})") from error
