"""Starting weights for the backbone: ``--init PATH`` (a local file or export) or ``--pretrained`` (timm's hub).

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


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors ``--init PATH`` names (see the module docstring for what PATH may be).

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder without an export in it.
        ValueError: a file that holds no weights or cannot be read as any of the formats.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        for candidate in (path / "backbone.safetensors", path / "model.safetensors",
                          path / "export" / "backbone.safetensors"):
            if candidate.is_file():
                return load_file(str(candidate))
        raise FileNotFoundError(2, "--init folder holds no export (backbone.safetensors or model.safetensors)",
                                str(path))
    if not path.is_file():
        raise FileNotFoundError(2, "No such --init file", str(path))
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError
            raise ValueError(f"--init {path}: not a readable safetensors file ({error})") from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle with code in it, a truncated file, not a checkpoint at all
        raise ValueError(f"--init {path}: not a safetensors file nor a PyTorch checkpoint that loads "
                         f"with weights_only=True ({str(error).strip().splitlines()[0][:200]})") from error
    if not isinstance(state, dict):
        raise ValueError(f"--init {path}: expected a dict of weights, got {type(state).__name__}")
    return _from_checkpoint(state, str(path))


def fit_to_backbone(weights: dict[str, torch.Tensor], backbone: nn.Module, *, where: str) -> dict[str, torch.Tensor]:
    """``weights`` checked against ``backbone``'s keys and shapes, a classifier head dropped.

    Raises:
        ValueError: keys missing or left over, or a shape that differs (the message names one).
    """
    expected = backbone.state_dict()
    classifier = getattr(backbone, "pretrained_cfg", {}).get("classifier") or ()
    heads = tuple(f"{name}." for name in ((classifier,) if isinstance(classifier, str) else classifier) if name)
    kept = {name: value for name, value in weights.items() if not (heads and name.startswith(heads)
                                                                   and name not in expected)}
    missing = [name for name in expected if name not in kept]
    unexpected = [name for name in kept if name not in expected]
    model = type(backbone).__name__
    if missing or unexpected:
        example = f"missing e.g. {missing[0]!r}" if missing else f"unexpected e.g. {unexpected[0]!r}"
        raise ValueError(f"--init {where}: the weights do not fit this {model} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected keys; {example}): is it the --model of the file?")
    for name, value in kept.items():
        if value.shape != expected[name].shape:
            raise ValueError(f"--init {where}: {name} has shape {tuple(value.shape)}, this {model} needs "
                             f"{tuple(expected[name].shape)}: is it the --model and --crop-size of the file?")
    return kept


def hub_weights(model_name: str, *, img_size: int | None) -> dict[str, torch.Tensor]:
    """timm's pretrained weights for ``model_name`` (``--pretrained``), as a backbone state dict.

    Raises:
        ValueError: timm has no weights for the model, or they are neither cached nor reachable.
    """
    import logging

    import timm

    if not _cached(model_name) and not _hub_reachable():
        raise ValueError(f"--pretrained: timm's weights for {model_name!r} are not in the local cache and "
                         f"the model hub ({_hub_host()}) cannot be reached from here; download them on a "
                         f"connected machine and pass the file with --init PATH")
    hub_log = logging.getLogger("huggingface_hub")
    level, hub_log.level = hub_log.level, logging.ERROR  # no retry chatter over the progress bar
    try:
        with torch.random.fork_rng(devices=[]):  # the run's generator stream stays untouched
            try:
                model = timm.create_model(model_name, pretrained=True, num_classes=0, img_size=img_size)
            except TypeError:  # the model takes no img_size (CNNs)
                model = timm.create_model(model_name, pretrained=True, num_classes=0)
    except RuntimeError as error:
        if "No pretrained weights" not in str(error):
            raise
        raise ValueError(f"--pretrained: timm has no pretrained weights for {model_name!r}") from error
    except OSError as error:  # the download failed half-way, a proxy refused it
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise ValueError(f"--pretrained: could not fetch timm's weights for {model_name!r} ({detail}); "
                         f"pass a downloaded file with --init PATH") from error
    finally:
        hub_log.setLevel(level)
    return model.state_dict()


def _hub_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connection within ``timeout`` s (not offline mode)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((_hub_host(), 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _cached(model_name: str) -> bool:
    """Whether timm's hub weights for ``model_name`` are in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        hub_id = getattr(get_pretrained_cfg(model_name), "hf_hub_id", None)
    except (ImportError, RuntimeError):
        return False
    return bool(hub_id) and any(isinstance(try_to_load_from_cache(hub_id, name), str)
                                for name in ("model.safetensors", "pytorch_model.bin"))


def initial_weights(config: Any, backbone: nn.Module) -> dict[str, torch.Tensor] | None:
    """The weights ``--init`` or ``--pretrained`` asks for, fitted to ``backbone``; None for neither."""
    if config.init is not None:
        return fit_to_backbone(read_weights(config.init), backbone, where=config.init)
    if config.pretrained:
        return fit_to_backbone(hub_weights(config.model, img_size=config.crop_size), backbone,
                               where=f"timm:{config.model}")
    return None
