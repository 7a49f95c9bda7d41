"""The step phase: one optimizer step from a batch of uint8 views, as every run takes it.

:class:`TrainStep` is public so that ``bench`` times exactly the trainer's step (views ->
recipe -> normalisation -> objective -> backward -> optimizer -> schedule) rather than a copy.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Sequence

import torch
from torch import nn

from ecomaug.config import TrainConfig
from ecomaug.listing_views import ListingViews
from ecomaug.normalise import Normalise
from ecomaug.objective import ContrastiveOutput, Objective

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parameter_groups(objective: nn.Module, *, weight_decay: float, backbone_lr_scale: float = 1.0,
                     split: bool = True) -> list[dict[str, Any]]:
    """timm's weight-decay groups (no decay on biases and norms), each split into backbone and head.

    Args:
        objective: the module being trained; its ``backbone`` attribute names the backbone.
        weight_decay: decay of the weights (biases and norm layers get none).
        backbone_lr_scale: the backbone groups' ``lr_scale`` (timm's schedulers multiply the lr by it).
        split: split into backbone and head groups; False keeps timm's two groups (a run that
            scales nothing, and so resumes checkpoints written before the split).

    Returns:
        Optimizer parameter groups; the backbone's carry ``backbone=True``. Empty groups are dropped.
    """
    from timm.optim import param_groups_weight_decay

    in_backbone = {id(param) for param in objective.backbone.parameters()}
    groups = []
    for group in param_groups_weight_decay(objective, weight_decay=weight_decay):
        if not split:
            groups.append(group)
            continue
        for backbone in (True, False):
            params = [param for param in group["params"] if (id(param) in in_backbone) == backbone]
            if params:
                groups.append({**group, "params": params, "backbone": backbone,
                               **({"lr_scale": backbone_lr_scale} if backbone else {})})
    return groups


def head_warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """``--head-warmup-steps``, capped at a quarter of the run: on a short run (a small dataset) the
    head-only phase must not take every step and leave the backbone where it started."""
    import logging

    steps = min(config.head_warmup_steps, total_steps // 4)
    if steps < config.head_warmup_steps:
        logging.getLogger(__name__).warning("--head-warmup-steps %d cut to %d, a quarter of this run's %d steps",
                                            config.head_warmup_steps, steps, total_steps)
    return steps


class TrainStep:
    """One training step of ``objective``, with the optimizer, LR schedule and AMP of a run.

    Build it with :meth:`from_config`. Calling it takes one step and counts it in :attr:`step`;
    :attr:`model` is what is called (the objective, or its DDP wrapper once :meth:`wrap` ran).

    Args:
        objective: the module being trained (see :class:`ecomaug.objective.Objective`).
        optimizer: its optimizer.
        scheduler: a timm scheduler stepped per update, or None.
        recipe: uint8 views -> float views in [0, 1]; None: the views are used as they are
            (uint8 views are scaled to [0, 1]).
        normalise: float views -> the model's normalised input.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` (with a gradient scaler).
        device: where the views and the objective are.
        total_steps: the run's length, for the objective's schedules.
        clip_grad: clip the gradient norm to this, or None.
        frozen_norms: batch-norm layers kept in eval mode at every step (``--freeze-bn``).
        head_warmup_steps: steps during which the optimizer groups marked ``backbone`` get no update.
        listing: swaps second views for views of another photo of the item (``--listing-positives``).

    Shape:
        - views: two :math:`(N, 3, S, S)` tensors on ``device`` (uint8, or float in [0, 1]).
    """

    def __init__(self, objective: Objective, *, optimizer: torch.optim.Optimizer, scheduler: Any,
                 recipe: nn.Module | None, normalise: Normalise, amp: str, device: torch.device,
                 total_steps: int, clip_grad: float | None = None,
                 frozen_norms: Sequence[nn.Module] = (), head_warmup_steps: int = 0,
                 listing: ListingViews | None = None) -> None:
        self.objective, self.model, self.listing = objective, objective, listing
        self.frozen_norms, self.head_warmup_steps = list(frozen_norms), head_warmup_steps
        # The backbone's share of the learning rate once the head warm-up is over (timm's schedulers
        # multiply each group's lr by its lr_scale).
        self.backbone_scales = {index: group.get("lr_scale", 1.0) for index, group in enumerate(optimizer.param_groups)
                                if group.get("backbone")}
        self.optimizer, self.scheduler, self.recipe, self.normalise = optimizer, scheduler, recipe, normalise
        self.device, self.total_steps, self.clip_grad = device, total_steps, clip_grad
        self.amp_dtype = AMP_DTYPES.get(amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.step = 0
        self.stats: dict[str, float] = {}
        self.start_at(0)

    @classmethod
    def from_config(cls, config: TrainConfig, objective: Objective, *, device: torch.device, lr: float,
                    total_steps: int, steps_per_epoch: int, recipe: nn.Module | None,
                    normalisation: dict[str, tuple[float, float, float]] | None = None) -> "TrainStep":
        """The step a run of ``config`` takes: timm's optimizer, warm-up and cosine over ``total_steps``.

        ``normalisation`` is the ``mean``/``std`` the backbone expects; default: what
        :func:`ecomaug.engine.initial_weights.input_normalisation` gives for ``config``.
        """
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        extra = {"momentum": config.sgd_momentum} if config.opt in ("sgd", "lars") else {}
        split = config.backbone_lr_scale != 1.0 or config.head_warmup_steps > 0
        optimizer = create_optimizer_v2(parameter_groups(objective, weight_decay=config.weight_decay,
                                                         backbone_lr_scale=config.backbone_lr_scale, split=split),
                                        opt=config.opt, lr=lr, weight_decay=config.weight_decay, **extra)
        # The warm-up and the cosine span the steps the run will take, so --max-steps shortens the
        # whole schedule (a cut run still ends at min_lr); timm counts them here in updates.
        warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps // 2)
        scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=total_steps,
                                           warmup_epochs=warmup_steps, warmup_lr=lr * 1e-3,
                                           min_lr=config.min_lr, step_on_epochs=False, updates_per_epoch=1)
        if normalisation is None:
            from ecomaug.engine.initial_weights import input_normalisation

            normalisation = input_normalisation(config)
        normalise = Normalise(channels_last=config.channels_last, **normalisation).to(device)
        frozen = [layer for encoder in objective.encoders()
                  for layer in getattr(encoder, "backbone", encoder).modules()
                  if isinstance(layer, nn.modules.batchnorm._BatchNorm)] if config.freeze_bn else []
        from ecomaug.distributed import get_rank

        listing = ListingViews(config.listing_positives, capacity=config.listing_table,
                               seed=config.seed + get_rank()) if config.listing_positives > 0 else None
        return cls(objective, optimizer=optimizer, scheduler=scheduler, recipe=recipe, normalise=normalise,
                   amp=config.amp, device=device, total_steps=total_steps, clip_grad=config.clip_grad,
                   frozen_norms=frozen, head_warmup_steps=head_warmup_steps(config, total_steps),
                   listing=listing)

    def autocast(self) -> AbstractContextManager:
        """The autocast context of the run's ``--amp`` (nothing when it is ``none``)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def start_at(self, step: int) -> None:
        """Continue counting from ``step`` (a resume): the schedules jump there."""
        self.step = step
        self._gate_backbone()
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=step)
        self.stats = self.objective.on_step_end(step, self.total_steps)

    def wrap(self, wrapper: nn.Module) -> None:
        """Call ``wrapper`` (DDP around :attr:`objective`) instead of the objective itself."""
        self.model = wrapper

    def views(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Batches of uint8 views -> the model's normalised inputs (recipe, then normalisation)."""
        if self.recipe is not None:
            return [self.normalise(self.recipe(view)) for view in views]
        return [self.normalise(view.float() / 255.0 if view.dtype == torch.uint8 else view) for view in views]

    def __call__(self, views: Sequence[torch.Tensor],
                 meta: Sequence[dict[str, Any]] | None = None) -> ContrastiveOutput:
        """Take one step on two views of a batch; return the objective's loss and accuracy."""
        if self.listing is not None:
            views = self.listing(views, meta)
        view_q, view_k = self.views(views)  # N x 3 x S x S each
        for layer in self.frozen_norms:  # whoever called .train() since, these stay in eval mode
            layer.eval()
        with self.autocast():
            output = self.model(view_q, view_k, meta=meta)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(output.loss).backward()
        if self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self._gate_backbone()
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.step)
        self.stats = self.objective.on_step_end(self.step, self.total_steps)
        if self.listing is not None:
            self.stats = {**self.stats, **self.listing.stats()}
        return output

    def _gate_backbone(self) -> None:
        """During the head warm-up the backbone's groups get lr 0 (the schedule applies lr_scale)."""
        warming = self.step < self.head_warmup_steps
        for index, scale in self.backbone_scales.items():  # by position: a resume replaces the group dicts
            group = self.optimizer.param_groups[index]
            group["lr_scale"] = 0.0 if warming else scale
            if warming:
                group["lr"] = 0.0

    @property
    def lr(self) -> float:
        """The head's learning rate now (the schedule's value; the backbone's is ``lr_scale`` times it)."""
        groups = self.optimizer.param_groups
        return next((group["lr"] for group in groups if not group.get("backbone")), groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's, the schedule's and the scaler's state (the objective's is saved apart)."""
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
