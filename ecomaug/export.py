"""Export a trained backbone for use outside ecomaug: safetensors weights plus a small config.

``OUT/backbone.safetensors`` holds exactly the state dict of
``timm.create_model(name, pretrained=False, num_classes=0)``; ``OUT/config.json`` says which
model that is and how its inputs were prepared::

    {"model": "resnet50", "num_features": 2048, "input_size": [3, 224, 224],
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_NAME = "backbone.safetensors"
CONFIG_NAME = "config.json"


def export_backbone(backbone: nn.Module | dict[str, torch.Tensor], out_dir: str | os.PathLike, *,
                    model_name: str, input_size: int, interpolation: str = "bilinear",
                    verify: bool = True) -> Path:
    """Write a backbone's weights and preprocessing config to ``out_dir``.

    Args:
        backbone: the timm backbone, or its state dict.
        out_dir: created if needed; existing export files are replaced.
        model_name: the timm name the weights belong to.
        input_size: side of the square images the backbone was trained on.
        interpolation: resize interpolation of the evaluation preprocessing.
        verify: create the timm model and load the weights strictly before writing.

    Returns:
        The directory written.

    Raises:
        ValueError: if ``verify`` and the weights do not fit ``model_name``.
    """
    from safetensors.torch import save_file

    import timm

    state = backbone.state_dict() if isinstance(backbone, nn.Module) else backbone
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}
    reference = timm.create_model(model_name, pretrained=False, num_classes=0)
    if verify:
        try:
            reference.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"the weights do not fit timm model {model_name!r}: "
                             f"{str(error).splitlines()[0]}") from error
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"model": model_name, "format": "pt"})
    config: dict[str, Any] = {
        "model": model_name,
        "num_features": int(reference.num_features),
        "input_size": [3, int(input_size), int(input_size)],
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "interpolation": interpolation,
    }
    from loaders.manifest import write_json_atomic

    write_json_atomic(out_dir / CONFIG_NAME, config)
    return out_dir


def backbone_state_from_checkpoint(state: dict[str, Any]) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """The timm name, backbone weights and training config inside a ``train.py`` checkpoint.

    Returns:
        ``(model_name, weights, config)``; the weights are those under
        ``state['backbone_prefix']`` (the query encoder's backbone), prefix removed.

    Raises:
        ValueError: if the checkpoint has no config or no backbone weights.
    """
    config = state.get("config") or {}
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError("the checkpoint has no training config with the timm model name")
    prefix = state.get("backbone_prefix", "encoder_q.backbone.")
    weights = {name[len(prefix):]: tensor for name, tensor in state["model"].items() if name.startswith(prefix)}
    if not weights:
        raise ValueError(f"the checkpoint holds no weights under {prefix!r}")
    return config["model"], weights, config


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Export the backbone of a training checkpoint written by ``train.py``.

    Raises:
        FileNotFoundError: if ``checkpoint`` does not exist.
        ValueError: if it is not a training checkpoint.
    """
    from ecomaug.checkpoint import load_checkpoint

    model_name, weights, config = backbone_state_from_checkpoint(load_checkpoint(checkpoint))
    return export_backbone(weights, out_dir, model_name=model_name, input_size=int(config.get("crop_size", 224)))


def load_exported(export_dir: str | os.PathLike, *, device: torch.device | str = "cpu") -> nn.Module:
    """Create the timm model an export describes and load its weights (in eval mode)."""
    from safetensors.torch import load_file

    import timm

    export_dir = Path(export_dir)
    config = json.loads((export_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    model = timm.create_model(config["model"], pretrained=False, num_classes=0)
    model.load_state_dict(load_file(str(export_dir / WEIGHTS_NAME)))
    return model.to(device).eval()
