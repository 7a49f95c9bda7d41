"""Export a trained backbone for use outside ecomaug: safetensors weights plus a small config.

``OUT/backbone.safetensors`` holds exactly the state dict of :func:`create_backbone`, i.e.
``timm.create_model(name, pretrained=False, num_classes=0)`` (with ``img_size=S`` for models
that take one, such as ViTs); ``OUT/config.json`` says which model that is and how its inputs
were prepared, both our way and timm's::

    {"model": "resnet50", "num_features": 2048, "input_size": [3, 224, 224],
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear",
     "architecture": "resnet50", "num_classes": 0, "model_args": {},
     "pretrained_cfg": {"input_size": [3, 224, 224], "interpolation": "bilinear", ...}}

``OUT/model.safetensors`` is the same file under the name timm looks for (a hard link, so no
second copy on disk), so ``timm.create_model("local-dir:OUT", pretrained=True)`` builds the
backbone with these weights and ``timm.data.resolve_data_config(model=...)`` gives the real
input size and interpolation. The files are staged beside the old ones and renamed together,
so a failed export (a full disk) leaves the previous export as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ecomaug.normalise import EVAL_INTERPOLATION, IMAGENET_MEAN, IMAGENET_STD

WEIGHTS_NAME = "backbone.safetensors"
CONFIG_NAME = "config.json"
TIMM_WEIGHTS_NAME = "model.safetensors"  # the name timm's local-dir: loader looks for
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, TIMM_WEIGHTS_NAME)


def check_model_name(model_name: str) -> None:
    """Raise ValueError, with similar names, unless timm knows ``model_name`` (cheap: nothing is built)."""
    import timm

    if ":" not in model_name and not timm.is_model(model_name):  # "hf-hub:..." names are resolved by timm
        close = timm.list_models(f"*{model_name[:6]}*")[:5] if model_name else []
        raise ValueError(f"unknown timm model {model_name!r}" + (f"; similar names: {close}" if close else ""))


def create_backbone(model_name: str, *, img_size: int | None = None) -> nn.Module:
    """The one way a backbone is created: ``timm.create_model(name, pretrained=False, num_classes=0)``.

    Args:
        model_name: a timm model name.
        img_size: side of the square inputs; passed to models that take it (ViTs and other
            models with position embeddings are built for one input size), ignored by the rest
            (CNNs take any size).

    Returns:
        The model, randomly initialised from torch's global generator.

    Raises:
        ValueError: an unknown name, or an ``img_size`` the model cannot be built for.
    """
    import timm

    check_model_name(model_name)
    try:
        if img_size is not None:
            try:
                return timm.create_model(model_name, pretrained=False, num_classes=0, img_size=img_size)
            except TypeError as error:  # the model has no img_size argument: it takes any size
                if "img_size" not in str(error):
                    raise
        return timm.create_model(model_name, pretrained=False, num_classes=0)
    except (RuntimeError, AssertionError) as error:  # timm: unknown name; a model: a size it cannot take
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot create timm model {model_name!r}"
                         + (f" for {img_size}-pixel inputs" if img_size else "") + f": {detail}") from error


def read_normalisation(config: dict[str, Any], *, where: str) -> dict[str, tuple[float, float, float]]:
    """The ``mean`` and ``std`` of an export's ``config.json`` (timm's ImageNet ones where it has none).

    Raises:
        ValueError: a mean or std that is not three finite numbers (std > 0).
    """
    import math

    values: dict[str, tuple[float, float, float]] = {}
    for name, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        value = config.get(name, default)
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
                or (name == "std" and min(value) <= 0)):
            raise ValueError(f"{where}: {name} must be three finite numbers{' > 0' if name == 'std' else ''}, "
                             f"got {value!r}")
        values[name] = tuple(float(v) for v in value)  # type: ignore[assignment]
    return values


# Resize interpolations timm's preprocessing knows (timm.data.transforms.str_to_interp_mode).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def check_weights(weights: dict[str, Any], backbone: nn.Module, *, where: str, hint: str) -> None:
    """Raise ValueError unless ``weights`` are exactly ``backbone``'s: every key and no other, each
    shape, floating point where the backbone's are, and every value finite.

    Args:
        weights: tensors by name (a file's, untrusted).
        backbone: the model they are for.
        where: the file or option, first in every message.
        hint: what to check, appended to a key or shape mismatch.

    Raises:
        ValueError: one line naming ``where`` and one offending key.
    """
    expected = backbone.state_dict()
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    model = type(backbone).__name__
    if missing or unexpected:
        example = f"missing e.g. {missing[0]!r}" if missing else f"unexpected e.g. {unexpected[0]!r}"
        raise ValueError(f"{where}: the weights do not fit this {model} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected keys; {example}): {hint}")
    for name, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: {name} is a {type(value).__name__}, not a tensor")
        if value.shape != expected[name].shape:
            raise ValueError(f"{where}: {name} has shape {tuple(value.shape)}, this {model} needs "
                             f"{tuple(expected[name].shape)}: {hint}")
        if expected[name].is_floating_point() and not value.is_floating_point():
            raise ValueError(f"{where}: {name} holds {value.dtype} values, this {model} needs floating point")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{where}: {name} holds {bad} NaN/inf values of {value.numel()}: broken weights "
                             "(a run that diverged?), refused")


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or ValueError naming the file (a cut-off or corrupt header).

    Raises:
        OSError: the file cannot be read at all (missing, no permission).
        ValueError: it is not a safetensors file.
    """
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except OSError:
        raise
    except Exception as error:  # safetensors raises its own SafetensorError
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(f"{path}: not a readable safetensors file ({detail})") from error


def read_export_config(path: str | os.PathLike) -> dict[str, Any]:
    """An export's ``config.json``, every field the loaders use checked (it may come from anywhere).

    Returns:
        ``model`` (a timm name), ``input_size`` (the side), ``extra_sizes`` (more sides to embed at:
        a multi-scale descriptor; empty where the file has none), ``mean``, ``std`` and, where the
        file has it, ``num_features``.

    Raises:
        ValueError: not a JSON object, an unknown model, an ``input_size`` that is not ``S`` or
            ``[3, S, S]`` with ``S`` in ``MIN_INPUT_SIZE..MAX_INPUT_SIZE``, a bad mean/std,
            interpolation or num_features; one line naming the file and the field.
    """
    from ecomaug.limits import check_extra_sizes, check_input_size

    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a JSON export config ({str(error).splitlines()[0]})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of export fields, got {type(config).__name__}")
    model = config.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"{path}: model must name a timm model, got {model!r}")
    try:
        check_model_name(model)
    except ValueError as error:
        raise ValueError(f"{path}: model: {error}") from error
    size = config.get("input_size", 224)
    if isinstance(size, list) and len(size) == 3 and size[0] == 3 and size[1] == size[2]:
        size = size[2]
    elif isinstance(size, list):
        raise ValueError(f"{path}: input_size must be S or [3, S, S] (square RGB), got {size!r}")
    result: dict[str, Any] = {"model": model, "input_size": check_input_size(size, name=f"{path}: input_size"),
                              "extra_sizes": check_extra_sizes(config.get("extra_sizes", []),
                                                               name=f"{path}: extra_sizes"),
                              **read_normalisation(config, where=str(path))}
    if config.get("interpolation", EVAL_INTERPOLATION) not in INTERPOLATIONS:
        raise ValueError(f"{path}: interpolation must be one of {list(INTERPOLATIONS)}, "
                         f"got {config['interpolation']!r}")
    if "num_features" in config:
        features = config["num_features"]
        if not isinstance(features, int) or isinstance(features, bool) or features < 1:
            raise ValueError(f"{path}: num_features must be a positive integer, got {features!r}")
        result["num_features"] = features
    return result


def export_sides(crop_size: int, export_size: int | None = None, multiscale: bool = False,
                 input_size: int | None = None) -> tuple[int, tuple[int, ...]]:
    """The side an export of a run records, and its extra sides.

    The side is ``input_size``, else the run's ``export_size``, else its ``crop_size``; with
    ``multiscale`` the training crop side is an extra side where it differs (a multi-scale
    descriptor, :func:`ecomaug.evaluation.models.pooled_descriptor`).
    """
    size = int(input_size or export_size or crop_size)
    return size, ((int(crop_size),) if multiscale and int(crop_size) != size else ())


def export_backbone(backbone: nn.Module | dict[str, torch.Tensor], out_dir: str | os.PathLike, *,
                    model_name: str, input_size: int, interpolation: str = EVAL_INTERPOLATION,
                    verify: bool = True, mean: tuple[float, float, float] = IMAGENET_MEAN,
                    std: tuple[float, float, float] = IMAGENET_STD, extra_sizes: Sequence[int] = ()) -> Path:
    """Write a backbone's weights and preprocessing config to ``out_dir``.

    Args:
        backbone: the timm backbone, or its state dict.
        out_dir: created if needed; existing export files are replaced.
        model_name: the timm name the weights belong to.
        input_size: side of the square images the backbone was trained on.
        interpolation: resize interpolation of the evaluation preprocessing.
        mean: the normalisation the backbone was trained with (the model's own, e.g. 0.5 for
            ``tf_efficientnet_lite0``); ``embed``, ``eval`` and ``match`` read it back.
        std: its standard deviation.
        extra_sizes: more sides ``embed``, ``eval`` and ``match`` embed at, averaging the
            L2-normalised features (a multi-scale descriptor; timm itself reads ``input_size`` only).
        verify: create the timm model and load the weights strictly before writing.

    Returns:
        The directory written.

    Raises:
        ValueError: if ``verify`` and the weights do not fit ``model_name`` or are not finite; an
            ``input_size`` out of ``MIN_INPUT_SIZE..MAX_INPUT_SIZE`` (:mod:`ecomaug.limits`).
        DiskFullError: the disk filled up; the previous export is intact and no temporary file is left.
    """
    from safetensors.torch import save as serialise

    from ecomaug.checkpoint import stage_file

    state = backbone.state_dict() if isinstance(backbone, nn.Module) else backbone
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}
    from ecomaug.limits import check_extra_sizes, check_input_size

    reference = create_backbone(model_name, img_size=check_input_size(input_size, name="input_size"))
    extra_sizes = check_extra_sizes(list(extra_sizes), name="extra_sizes")
    positions = getattr(reference, "pos_embed", None)
    if positions is not None and "pos_embed" in state and tuple(state["pos_embed"].shape) != tuple(positions.shape):
        raise ValueError(f"{model_name} has position embeddings for the input size it was trained at, not "
                         f"{input_size} px: export it at its training size")
    if positions is not None and extra_sizes:
        raise ValueError(f"{model_name} has position embeddings for one input size: no extra sizes "
                         f"(multi-scale) for it")
    if verify:  # what embed will check when it loads the export (NaN weights included), checked now
        check_weights(state, reference, where=f"timm model {model_name!r}",
                      hint="the model name and the weights disagree")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = serialise(state, metadata={"model": model_name, "format": "pt"})
    config = export_config(reference, model_name, input_size, interpolation, mean=mean, std=std)
    text = (json.dumps({**config, "extra_sizes": list(extra_sizes)}, indent=2) + "\n").encode("utf-8")
    staged: dict[Path, Path] = {}
    try:  # stage both files, then rename both: the old export stays whole if anything fails
        staged[out_dir / WEIGHTS_NAME] = stage_file(out_dir / WEIGHTS_NAME, lambda stream: stream.write(weights))
        staged[out_dir / CONFIG_NAME] = stage_file(out_dir / CONFIG_NAME, lambda stream: stream.write(text))
        for target, temporary in staged.items():
            os.replace(temporary, target)
        staged[out_dir / TIMM_WEIGHTS_NAME] = _link_or_copy(out_dir / WEIGHTS_NAME, out_dir / TIMM_WEIGHTS_NAME)
        os.replace(staged[out_dir / TIMM_WEIGHTS_NAME], out_dir / TIMM_WEIGHTS_NAME)
    finally:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)
    return out_dir


def export_config(reference: nn.Module, model_name: str, input_size: int, interpolation: str, *,
                  mean: tuple[float, float, float] = IMAGENET_MEAN,
                  std: tuple[float, float, float] = IMAGENET_STD) -> dict[str, Any]:
    """``config.json``: ecomaug's fields and timm's (``architecture``, ``model_args``, ``pretrained_cfg``)."""
    import inspect

    size = [3, int(input_size), int(input_size)]
    preprocessing = {"input_size": size, "interpolation": interpolation, "mean": [float(v) for v in mean],
                     "std": [float(v) for v in std]}
    # Models built for one input size (ViTs) need img_size to rebuild as trained; CNNs take none.
    takes_size = "img_size" in inspect.signature(type(reference).__init__).parameters
    return {"model": model_name, "num_features": int(reference.num_features), **preprocessing,
            "architecture": model_name, "num_classes": 0,
            "model_args": {"img_size": int(input_size)} if takes_size else {},
            # The loaders' eval mode: shorter side to S, the centre S x S square (crop_pct 1).
            "pretrained_cfg": {**preprocessing, "crop_pct": 1.0, "crop_mode": "center", "num_classes": 0}}


def _link_or_copy(source: Path, target: Path) -> Path:
    """A temporary beside ``target`` holding ``source``'s bytes: a hard link, or a copy where links fail."""
    from ecomaug.checkpoint import stage_file

    temporary = target.with_name(f".{target.name}.link")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:  # a file system without hard links
        data = source.read_bytes()
        return stage_file(target, lambda stream: stream.write(data))
    return temporary


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


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                      input_size: int | None = None, multiscale: bool | None = None) -> Path:
    """Export the backbone of a training checkpoint written by ``train.py``.

    The export records ``input_size`` as the side to feed the backbone; default: the run's
    ``export_size``, else its ``crop_size``. With ``multiscale`` (default: the run's
    ``export_multiscale``) it also embeds at the run's ``crop_size`` (:func:`export_sides`).

    Raises:
        FileNotFoundError: if ``checkpoint`` does not exist.
        ValueError: if it is not a training checkpoint.
    """
    from ecomaug.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    model_name, weights, config = backbone_state_from_checkpoint(state)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(20, "--out is a file, not a directory", str(out_dir))
    normalisation = checkpoint_normalisation(state, where=str(checkpoint))
    if multiscale is None:
        multiscale = bool(config.get("export_multiscale", False))
    size, extra = export_sides(config.get("crop_size", 224), config.get("export_size"), multiscale, input_size)
    return export_backbone(weights, out_dir, model_name=model_name, input_size=size, extra_sizes=extra,
                           **normalisation)


def checkpoint_normalisation(state: dict[str, Any], *, where: str) -> dict[str, tuple[float, float, float]]:
    """The mean and std a training checkpoint's run fed its backbone (recorded since the run
    derives them from its model; an older checkpoint's were timm's ImageNet constants)."""
    derived = state.get("derived") or {}
    return read_normalisation(derived if isinstance(derived, dict) else {}, where=where)
