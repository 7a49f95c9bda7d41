"""Your own augmentation in a recipe: a stage given as ``module:Class`` with its arguments.

The contract (also in docs/augmentations.md, "Train with your own pool and augmentations"):

* **Class.** A Kornia augmentation: any of ``kornia.augmentation`` (e.g.
  ``kornia.augmentation:RandomSharpness``), or your own subclass of
  ``IntensityAugmentationBase2D`` / ``GeometricAugmentationBase2D`` (or ``MixAugmentationBaseV2``).
  Its constructor takes the stage's ``args`` as keyword arguments.
* **Input.** The recipe converts a uint8 batch to float32 in [0, 1] on entry, so every stage gets
  :math:`(B, 3, H, W)` float32 in [0, 1] on the batch's device and must return the same shape
  (values are clamped to [0, 1] at the end).
* **Randomness.** A class that subclasses :class:`~ecomaug.augmentation.sampling.SeededAugmentation`
  draws from the recipe's seeded source (its ``source`` is set for it). Any other Kornia class draws
  from torch's global generator, so it runs inside ``torch.random.fork_rng`` seeded from the
  recipe's source: the views are reproducible from the run's seed and the global state is untouched.
* **Replay.** After a call, ``_params`` holds the parameters (with ``batch_prob``, which samples it
  changed); ``stage(x, params=...)`` redraws the same view. Kornia's base classes do both.

Only the module a user names in their own recipe file or flag is imported, never a name read
from data, and importing it runs its code, as running a script would: a recipe file is code. The
current folder is not searched for it (``python -m ecomaug`` and ``python -c`` put it first on
``sys.path``, so a stray ``x.py`` there would run): the module must be installed, or its folder
named in ``PYTHONPATH`` (``PYTHONPATH=. ecomaug preview ...`` asks for the current folder).
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from kornia.augmentation import AugmentationBase2D, MixAugmentationBaseV2
from torch import nn

from ecomaug.augmentation.sampling import RandomSource, SeededAugmentation


def import_stage_class(target: str) -> type:
    """The class named by ``target`` (``"package.module:Class"``).

    Raises:
        ValueError: ``target`` is not ``module:Class``, the module cannot be imported, it has no such
            class, or the class is not a Kornia augmentation.
    """
    module_name, sep, class_name = str(target).partition(":")
    if not sep or not module_name.strip() or not class_name.strip() or ":" in class_name:
        raise ValueError(f"a custom stage is 'module:Class' (e.g. kornia.augmentation:RandomSharpness), got {target!r}")
    try:
        with _current_folder_not_searched():
            module = importlib.import_module(module_name.strip())
    except ImportError as error:
        raise ValueError(f"custom stage {target!r}: cannot import {module_name!r} ({error}); the current folder "
                         f"is not searched: install the module or put its folder on PYTHONPATH") from error
    found = getattr(module, class_name.strip(), None)
    if not isinstance(found, type):
        raise ValueError(f"custom stage {target!r}: {module_name!r} has no class {class_name!r}")
    if not issubclass(found, (AugmentationBase2D, MixAugmentationBaseV2)):
        raise ValueError(f"custom stage {target!r}: {found.__name__} is not a Kornia augmentation "
                         "(subclass IntensityAugmentationBase2D, GeometricAugmentationBase2D or MixAugmentationBaseV2)")
    return found


@contextmanager
def _current_folder_not_searched() -> Iterator[None]:
    """``sys.path`` without the current folder that ``python -m``/``-c`` put first, unless PYTHONPATH names it."""
    first = sys.path[0] if sys.path else None
    asked = {os.path.abspath(entry) for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry}
    if first is None or os.path.abspath(first) != os.getcwd() or os.getcwd() in asked:
        yield
        return
    del sys.path[0]
    try:
        yield
    finally:
        sys.path.insert(0, first)


def build_custom_stage(target: str, args: Mapping[str, Any], source: RandomSource) -> nn.Module:
    """Instantiate ``target`` with ``args`` and route its randomness through ``source``.

    Returns:
        The augmentation itself when it draws from a :class:`RandomSource`, else a
        :class:`ForkedRandomStage` around it.

    Raises:
        ValueError: a bad ``target`` (see :func:`import_stage_class`) or arguments the class refuses.
    """
    cls = import_stage_class(target)
    if "source" in args:
        raise ValueError(f"custom stage {target!r}: 'source' is the recipe's; leave it out of the arguments")
    try:
        stage = cls(**dict(args))
    except (TypeError, ValueError) as error:
        raise ValueError(f"custom stage {target!r} with arguments {dict(args)}: {error}") from error
    if isinstance(stage, SeededAugmentation):
        stage.source = source
        return stage
    return ForkedRandomStage(stage, source)


class ForkedRandomStage(nn.Module):
    """Run a Kornia augmentation that uses torch's global generator on a fork of it, seeded per call.

    Args:
        stage: the augmentation.
        source: the recipe's source; each call draws the seed of the forked generator from it.

    Shape:
        - Input: :math:`(B, 3, H, W)` float in [0, 1].
        - Output: what ``stage`` returns.
    """

    def __init__(self, stage: nn.Module, source: RandomSource) -> None:
        super().__init__()
        self.stage, self.source = stage, source

    @property
    def _params(self) -> dict[str, torch.Tensor]:
        return self.stage._params

    def forward(self, images: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if params is not None:  # a replay draws nothing
            return self.stage(images, params=params)
        # One host sync per call: the forked generator is seeded with a Python int.
        seed = int(self.source.randint(2 ** 31 - 1, (1,), images.device).item())
        cuda = [images.device.index if images.device.index is not None else torch.cuda.current_device()] \
            if images.is_cuda else []
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(seed)
            for index in cuda:
                torch.cuda.default_generators[index].manual_seed(seed)
            return self.stage(images)

    def extra_repr(self) -> str:
        return "global generator forked and seeded from the recipe's source on each call"
