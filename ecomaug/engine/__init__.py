"""The training engine: ``setup -> step -> checkpoint -> finish`` for any objective.

``train.py``, ``ecomaug train``, ``bench`` and the GPU checks all run training through here:

- :func:`train` runs a :class:`~ecomaug.config.TrainConfig` and returns a :class:`TrainResult`;
- :class:`Trainer` is the same run, phase by phase (``setup``, ``step``, ``checkpoint``, ``finish``);
- :class:`TrainStep` is one optimizer step (recipe, normalisation, objective, backward, schedule);
- :func:`main` / :func:`run` are the command line (flags, ``--config``, ``--log-level``).

One file per concern: ``setup`` (device, plan, objective, views), ``step``, ``trainer`` (the
phases), ``metrics``, ``monitor`` (held-out recall), ``rundir``, ``sample``, ``signals``,
``errors``, ``command``.

Each name is imported on first use, so that ``train.py --help`` and a bad flag answer without
importing torch and timm (the command line parses before it builds anything).
"""

from loaders.lazy import lazy_exports

# name -> the module defining it.
_LAZY_EXPORTS = {
    "main": "ecomaug.engine.command", "run": "ecomaug.engine.command",
    "NonFiniteLossError": "ecomaug.engine.errors", "OutOfMemoryError": "ecomaug.engine.errors",
    "TrainingAborted": "ecomaug.engine.errors", "TrainingInterrupted": "ecomaug.engine.errors",
    "RunPlan": "ecomaug.engine.setup", "build_objective": "ecomaug.engine.setup",
    "build_views": "ecomaug.engine.setup", "plan_run": "ecomaug.engine.setup",
    "setup_distributed": "ecomaug.engine.setup", "StopSignals": "ecomaug.engine.signals",
    "TrainStep": "ecomaug.engine.step", "Trainer": "ecomaug.engine.trainer",
    "TrainResult": "ecomaug.engine.trainer", "train": "ecomaug.engine.trainer",
}
__all__ = sorted(_LAZY_EXPORTS)

__getattr__ = lazy_exports(__name__, _LAZY_EXPORTS)
