"""What the training engine asks of an objective (MoCo, the Siamese baseline, or a new one).

An objective is an ``nn.Module`` that turns two views of a batch into a loss. The engine knows
nothing else about it: it calls ``forward`` (through DDP when there are ranks), then
``on_step_end`` after every optimizer step, ``load_backbone`` for ``--init``, checkpoints ``generators()``, compiles
``encoders()``, and exports ``backbone`` (whose keys sit under ``backbone_prefix`` in the
objective's ``state_dict``). To add an objective, write one module with these members and name
it in :func:`ecomaug.engine.setup.build_objective`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import nn


@dataclass
class ContrastiveOutput:
    """What an objective returns for one step.

    Attributes:
        loss: scalar, the objective to minimise.
        accuracy: scalar, how often the positive scored highest (a cheap health signal).
    """

    loss: torch.Tensor
    accuracy: torch.Tensor


@runtime_checkable
class Objective(Protocol):
    """The members the engine uses; :class:`~ecomaug.moco.MoCo` and :class:`~ecomaug.siamese.Siamese` have them.

    Attributes:
        backbone_prefix: where the backbone's weights sit in ``state_dict()`` (for export).
        bn_splits: batch-norm sub-batches per device actually used (logged by the engine).
    """

    backbone_prefix: str
    bn_splits: int

    @property
    def backbone(self) -> nn.Module:
        """The timm backbone that is evaluated and exported."""

    def forward(self, view_q: torch.Tensor, view_k: torch.Tensor, *,
                meta: Sequence[dict[str, Any]] | None = None) -> ContrastiveOutput:
        """The loss of one batch of two views (``meta``: each sample's metadata, e.g. item_id)."""

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        """Called with the steps done so far (after each step, and once before the first):
        update schedules; return values to log with the step's record."""

    def load_backbone(self, weights: dict[str, torch.Tensor]) -> None:
        """Start the backbone (every copy of it, e.g. MoCo's key encoder) from ``weights``."""

    def generators(self) -> dict[str, torch.Generator]:
        """Random generators the objective draws from, saved in checkpoints."""

    def encoders(self) -> list[nn.Module]:
        """The encoders ``--compile`` compiles in place."""

    def summary(self) -> dict[str, Any]:
        """A few numbers about its state (e.g. the queue pointer) for the resume record."""

    def health(self) -> dict[str, float]:
        """Collapse signals logged with every train record (MoCo v2: ``key_cos``); may be empty."""
