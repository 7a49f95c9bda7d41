"""Embeddings with a trained backbone: load it (export, checkpoint or random init), embed images.

A model comes from an export directory (``backbone.safetensors`` + ``config.json``), a run
directory (its ``export/``, else its newest ``checkpoints/ckpt-*.pt``), a checkpoint file (read
with ``weights_only=True``), or a timm name with random weights (the random-init baseline).
Images are resized (shorter side to the input size) and centre-cropped like the loaders' eval
mode, normalised with the model's mean/std and embedded in batches on the given device. The
result is saved as one ``.npz`` holding the embeddings, their keys and each sample's metadata.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def _create(model_name: str) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(model_name, pretrained=False, num_classes=0)
    except RuntimeError as error:  # timm raises RuntimeError for unknown names
        raise ValueError(f"unknown timm model {model_name!r} ({error})") from error


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
    backbone = _create(config["model"])
    backbone.load_state_dict(load_file(str(weights_path)))
    return EmbeddingModel(backbone=backbone.to(device).eval(), model_name=config["model"],
                          input_size=_input_side(config.get("input_size", 224)),
                          mean=tuple(config.get("mean", IMAGENET_MEAN)),
                          std=tuple(config.get("std", IMAGENET_STD)), source=str(directory))


def load_checkpoint(path: str | os.PathLike, *, device: torch.device,
                    input_size: int | None = None) -> EmbeddingModel:
    """Load the query backbone of a training checkpoint (``torch.load(weights_only=True)``).

    Args:
        path: ``RUN/checkpoints/ckpt-*.pt``.
        device: where the backbone runs.
        input_size: crop side; default: the run's ``crop_size``.
    """
    from ecomaug.checkpoint import load_checkpoint as read_checkpoint
    from ecomaug.export import backbone_state_from_checkpoint

    path = Path(path)
    try:
        model_name, state, config = backbone_state_from_checkpoint(read_checkpoint(path))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    backbone = _create(model_name)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: backbone weights do not fit {model_name} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]})")
    size = input_size or config.get("crop_size") or 224
    return EmbeddingModel(backbone=backbone.to(device).eval(), model_name=model_name,
                          input_size=_input_side(size), source=str(path))


def random_init_model(model_name: str, *, device: torch.device, input_size: int = 224,
                      seed: int = 0) -> EmbeddingModel:
    """The random-init baseline: a timm backbone with freshly initialised, seeded weights."""
    # timm initialises from the global generator; fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = _create(model_name)
    return EmbeddingModel(backbone=backbone.to(device).eval(), model_name=model_name,
                          input_size=_input_side(input_size), source=f"random-init:{model_name}")


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


def prepare(image: Image.Image | bytes, size: int) -> torch.Tensor:
    """Decode if needed, resize the shorter side to ``size`` and centre-crop a square.

    Shape:
        - output: :math:`(3, size, size)` uint8.
    """
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                           Image.BICUBIC, reducing_gap=3.0)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    crop = resized.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)


@dataclass
class Embeddings:
    """Embeddings with the key and metadata of every row.

    Shape:
        - vectors: :math:`(N, D)` float32 (not normalised; retrieval normalises).
    """

    vectors: torch.Tensor
    keys: list[str]
    meta: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    def column(self, name: str) -> list[Any]:
        """One metadata column (e.g. ``item_id``), None where a row lacks it."""
        return [row.get(name) for row in self.meta]

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``.npz`` with ``vectors``, ``keys``, ``meta`` (JSON per row), ``info`` (JSON)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"embeddings are saved as .npz; got {path.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(temporary, vectors=self.vectors.float().cpu().numpy(),
                 keys=np.array(self.keys, dtype=str),
                 meta=np.array([json.dumps(row, sort_keys=True) for row in self.meta], dtype=str),
                 info=np.array(json.dumps(self.info, sort_keys=True)))
        os.replace(temporary, path)
        return path


def load_embeddings(path: str | os.PathLike) -> Embeddings:
    """Read a file written by :meth:`Embeddings.save` (no pickle involved)."""
    with np.load(path, allow_pickle=False) as data:
        return Embeddings(vectors=torch.from_numpy(data["vectors"]), keys=data["keys"].tolist(),
                          meta=[json.loads(row) for row in data["meta"].tolist()],
                          info=json.loads(str(data["info"])))


Sample = tuple[str, dict[str, Any], Any]  # key, metadata, image (bytes or PIL) or a callable


def embed_samples(model: EmbeddingModel, samples: Iterable[Sample], *, batch_size: int = 64,
                  total: int | None = None, progress: bool = True,
                  description: str = "embed") -> Embeddings:
    """Embed ``(key, meta, image)`` samples in batches on the model's device.

    Args:
        model: the backbone and its preprocessing.
        samples: ``image`` is encoded bytes, a PIL image, or a zero-argument callable returning
            either (so disturbed queries are made only when their batch is embedded).
        batch_size: images per forward pass.
        total: number of samples, for the progress bar.
        progress: show a tqdm bar.
        description: the bar's label.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    from tqdm.auto import tqdm

    keys: list[str] = []
    meta: list[dict[str, Any]] = []
    chunks: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    bar = tqdm(total=total, desc=description, unit="img", disable=not progress)
    for key, row, image in samples:
        if callable(image):
            image = image()
        pending.append(prepare(image, model.input_size))
        keys.append(key)
        meta.append(row)
        if len(pending) == batch_size:
            chunks.append(model.embed(torch.stack(pending)).cpu())
            bar.update(len(pending))
            pending = []
    if pending:
        chunks.append(model.embed(torch.stack(pending)).cpu())
        bar.update(len(pending))
    bar.close()
    if not chunks:
        raise ValueError("no images to embed")
    return Embeddings(vectors=torch.cat(chunks), keys=keys, meta=meta, info=model.info())


def iter_shard_samples(shards: Any) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """Yield ``(key, meta, jpeg bytes)`` of every sample in shard order (no decoding)."""
    from loaders.manifest import load_shard_set

    shard_set = load_shard_set(shards)
    for shard in shard_set.shards:
        if shard.is_local:
            streams = _iter_tar(tarfile.open(shard.url, "r"))
        else:
            import webdataset

            streams = ((s["__key__"], s["json"], s["jpg"]) for s in
                       webdataset.WebDataset(shard.url, shardshuffle=False, empty_check=False))
        for key, meta_bytes, jpeg in streams:
            meta = json.loads(meta_bytes) if meta_bytes else {"key": key}
            yield key, meta, jpeg


def _iter_tar(archive: tarfile.TarFile) -> Iterator[tuple[str, bytes | None, bytes]]:
    with archive:
        members: dict[str, dict[str, bytes]] = {}
        order: list[str] = []
        for member in archive:
            if not member.isfile():
                continue
            key, _, extension = member.name.rpartition("/")[2].partition(".")
            if key not in members:
                members[key] = {}
                order.append(key)
            members[key][extension] = archive.extractfile(member).read()  # type: ignore[union-attr]
        for key in order:
            if "jpg" in members[key]:
                yield key, members[key].get("json"), members[key]["jpg"]


def iter_folder_samples(folder: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """Yield ``(relative path, {"source": ...}, bytes)`` for every image under ``folder``."""
    folder = Path(folder)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    for path in paths:
        relative = path.relative_to(folder).as_posix()
        yield relative, {"source": relative}, path.read_bytes()


def iter_csv_samples(manifest: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """Yield the images an ``items.csv`` lists (``path`` relative to the csv) with its columns."""
    import csv

    manifest = Path(manifest)
    with open(manifest, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    if not rows or "path" not in rows[0]:
        raise ValueError(f"{manifest}: a manifest needs a 'path' column and at least one row")
    for row in rows:
        path = manifest.parent / row["path"]
        yield row["path"], {"source": row["path"], **row}, path.read_bytes()


def count_samples(data: str | os.PathLike) -> int | None:
    """How many images ``data`` holds, where known without reading it."""
    path = Path(data)
    if path.is_dir() and not any(path.glob("manifest*.json")) and not any(path.glob("*.tar")):
        return sum(1 for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if path.suffix == ".csv":
        return None
    from loaders.manifest import load_shard_set

    return load_shard_set(data).num_samples


def iter_data(data: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """Samples of shards (dir, manifest, tar, pattern, URL), an ``items.csv`` or an image folder."""
    text = os.fspath(data)
    path = Path(text)
    if path.suffix == ".csv":
        return iter_csv_samples(path)
    if path.is_dir() and not any(path.glob("manifest*.json")) and not any(path.glob("*.tar")):
        return iter_folder_samples(path)
    return iter_shard_samples(text)


def _is_shards(data: str | os.PathLike) -> bool:
    path = Path(data)
    if path.suffix == ".csv":
        return False
    return not (path.is_dir() and not any(path.glob("manifest*.json"))
                and not any(path.glob("*.tar")))


def embed_with_loader(model: EmbeddingModel, shards: str | os.PathLike, *, batch_size: int = 64,
                      backend: str = "auto", progress: bool = True) -> Embeddings:
    """Embed shards through ``loaders.build_loader(mode="eval")`` (DALI decodes on the GPU).

    The loader yields every sample once, resized and centre-cropped to the model's input size.
    """
    from tqdm.auto import tqdm

    from loaders.build import build_loader

    loader = build_loader(shards, backend=backend, device=model.device, batch_size=batch_size,
                          views=1, crop_size=model.input_size, mode="eval")
    keys: list[str] = []
    meta: list[dict[str, Any]] = []
    chunks: list[torch.Tensor] = []
    for batch in tqdm(loader, total=len(loader), desc=f"embed ({loader.backend})", unit="batch",
                      disable=not progress):
        chunks.append(model.embed(batch.views[0]).cpu())
        keys.extend(batch.keys)
        meta.extend(batch.meta or [{"key": key} for key in batch.keys])
    if not chunks:
        raise ValueError(f"{shards}: no samples to embed")
    info = {**model.info(), "loader": loader.backend}
    return Embeddings(vectors=torch.cat(chunks), keys=keys, meta=meta, info=info)


def embed_data(model: EmbeddingModel, data: str | os.PathLike, *, batch_size: int = 64,
               loader: str = "builtin", progress: bool = True) -> Embeddings:
    """Embed every image of shards, an ``items.csv`` or a plain folder, in order.

    Args:
        model: see :func:`load_model` / :func:`random_init_model`.
        data: a shard directory / manifest / tar / brace pattern / URL, an ``items.csv``, or a
            folder of images (keys are then the relative paths).
        batch_size: images per forward pass.
        loader: for shards: ``"builtin"`` (decode with PIL here, the same path ``ecomaug eval``
            uses for gallery and queries) or a ``build_loader`` backend (``"auto"``, ``"dali"``,
            ``"torch"``) for fast decoding on the device.
        progress: show a tqdm bar.
    """
    if loader != "builtin":
        if not _is_shards(data):
            raise ValueError(f"loader={loader!r} reads shards only; {data} is a folder or csv "
                             "(use loader='builtin')")
        return embed_with_loader(model, data, batch_size=batch_size, backend=loader,
                                 progress=progress)
    return embed_samples(model, iter_data(data), batch_size=batch_size, progress=progress,
                         total=count_samples(data), description="embed")


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

