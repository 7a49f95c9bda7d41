"""The training engine: ``setup -> step -> checkpoint -> finish`` for any objective.

``train.py``, ``ecomaug train``, ``bench`` and the GPU checks all run training through here:

- :func:`train` runs a :class:`~ecomaug.config.TrainConfig` and returns a :class:`TrainResult`;
- :class:`Trainer` is the same run, phase by phase (``setup``, ``step``, ``checkpoint``, ``finish``);
- :class:`TrainStep` is one optimizer step (recipe, normalisation, objective, backward, schedule);
- :func:`main` / :func:`run` are the command line (flags, ``--config``, ``--log-level``).

One file per concern: ``setup`` (device, plan, objective, views), ``step``, ``trainer`` (the
phases), ``metrics``, ``monitor`` (held-out recall), ``rundir``, ``sample``, ``signals``,
``errors``, ``command``.
"""

from ecomaug.engine.command import main, run
from ecomaug.engine.errors import NonFiniteLossError, OutOfMemoryError, TrainingAborted, TrainingInterrupted
from ecomaug.engine.setup import RunPlan, build_objective, build_views, plan_run, setup_distributed
from ecomaug.engine.signals import StopSignals
from ecomaug.engine.step import TrainStep
from ecomaug.engine.trainer import Trainer, TrainResult, train

__all__ = ["NonFiniteLossError", "OutOfMemoryError", "RunPlan", "StopSignals", "TrainResult", "TrainStep",
           "Trainer", "TrainingAborted", "TrainingInterrupted", "build_objective", "build_views", "main",
           "plan_run", "run", "setup_distributed", "train"]
