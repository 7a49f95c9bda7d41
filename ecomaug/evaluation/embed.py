"""Embeddings with a trained backbone: load it (export, checkpoint or random init), embed images.

A model comes from an export directory (``backbone.safetensors`` + ``config.json``), a run
directory (its ``export/``, else its newest ``checkpoints/ckpt-*.pt``), a checkpoint file (read
with ``weights_only=True``), or a timm name with random weights (the random-init baseline).
Images are cut and resized exactly as the loaders' eval mode does (:func:`prepare`: the centre
square, antialiased bilinear, the export's ``interpolation``), normalised with the model's mean/std and embedded in batches on the given device. The
result is saved as one ``.npz`` holding the embeddings, their keys and each sample's metadata,
or streamed by :func:`embed_to_parts` into a folder of such files (resumable, split by rank),
which :func:`load_embeddings` reads as one set. Readers record what they cannot read in a
:class:`ReadReport` (or raise naming the shard) instead of failing with a traceback.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from ecomaug.normalise import IMAGENET_MEAN, IMAGENET_STD  # timm's: the one normalisation
from loaders.atomic import DiskFullError, write_atomic  # noqa: F401 -- DiskFullError: raised by save
from loaders.convert.hygiene import read_image
from loaders.convert.inputs import list_image_files

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


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
    backbone = _create(config["model"], _input_side(config.get("input_size", 224)))
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
    backbone = _create(model_name, config.get("crop_size"))
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
        backbone = _create(model_name, _input_side(input_size))
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
    """Decode if needed, then the loaders' eval crop: the centre square, resized to ``size``.

    The same preprocessing as ``build_loader(mode="eval")`` (the centred square that "shorter
    side to ``size``, centre crop" keeps, resized with torch's antialiased bilinear kernel,
    :func:`loaders.crops.resize_crop`) and as the export's ``interpolation`` says.

    Shape:
        - output: :math:`(3, size, size)` uint8.
    """
    from loaders.crops import resize_crop
    from loaders.torch_backend import centre_box

    if isinstance(image, (bytes, bytearray)):
        image = read_image(bytes(image))  # as the shard conversion reads: EXIF, alpha on white
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())  # H x W x 3
    height, width = pixels.shape[:2]
    left, top, side, _ = centre_box(width, height)
    x0, y0 = round(left), round(top)  # rounded as the loaders round their windows
    x1, y1 = max(round(left + side), x0 + 1), max(round(top + side), y0 + 1)
    return resize_crop(pixels, y0, x0, y1 - y0, x1 - x0, size).contiguous()  # 3 x S x S


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
        buffer = io.BytesIO()  # np.savez wants a seekable file; the atomic writer streams
        np.savez(buffer, vectors=self.vectors.float().cpu().numpy(), keys=np.array(self.keys, dtype=str),
                 meta=np.array([json.dumps(row, sort_keys=True) for row in self.meta], dtype=str),
                 info=np.array(json.dumps(self.info, sort_keys=True)))
        write_atomic(path, lambda stream: stream.write(buffer.getbuffer()))
        return path


def load_embeddings(path: str | os.PathLike) -> Embeddings:
    """Read a file written by :meth:`Embeddings.save`, or a parts folder of :func:`embed_to_parts`.

    A folder is read as one set: every rank's parts in rank and part order, which is the data's
    order. It must be complete (every rank finished); no pickle is involved.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not an embeddings file, or an unfinished parts folder.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "No such embeddings file or folder", str(path))
    if path.is_dir():
        return _load_parts(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return Embeddings(vectors=torch.from_numpy(data["vectors"]),
                              keys=data["keys"].tolist(),
                              meta=[json.loads(row) for row in data["meta"].tolist()],
                              info=json.loads(str(data["info"])))
    except (OSError, KeyError, ValueError, EOFError) as error:
        raise ValueError(f"{path}: not an embeddings file written by ecomaug embed "
                         f"({_reason(error)})") from error


PART_PATTERN = "part-r{rank:05d}-{part:06d}.npz"
DONE_PATTERN = "done-r{rank:05d}-of-{world_size:05d}.json"


def is_parts_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`embed_to_parts`."""
    path = Path(path)
    return path.is_dir() and (any(path.glob("done-r*-of-*.json")) or any(path.glob("part-r*.npz")))


def _load_parts(folder: Path) -> Embeddings:
    done = sorted(folder.glob("done-r*-of-*.json"))
    if not done:
        if any(folder.glob("part-r*.npz")):
            raise ValueError(f"{folder}: the embedding was not finished (no rank is done); rerun "
                             "the same ecomaug embed command to complete it")
        raise ValueError(f"{folder}: not an embeddings folder (no part-r*.npz / done-r*.json)")
    records = [json.loads(p.read_text(encoding="utf-8")) for p in done]
    world_sizes = {record["world_size"] for record in records}
    if len(world_sizes) != 1:
        raise ValueError(f"{folder}: parts of runs with different world sizes {sorted(world_sizes)}")
    world_size = world_sizes.pop()
    finished = {record["rank"] for record in records}
    missing = sorted(set(range(world_size)) - finished)
    if missing:
        raise ValueError(f"{folder}: ranks {missing} of {world_size} have not finished; rerun them "
                         "with the same ecomaug embed command")
    vectors: list[torch.Tensor] = []
    keys: list[str] = []
    meta: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    for record in sorted(records, key=lambda r: r["rank"]):
        for part in range(record["parts"]):
            piece = load_embeddings(folder / PART_PATTERN.format(rank=record["rank"], part=part))
            if not piece.keys:
                continue  # every sample of this part was skipped
            vectors.append(piece.vectors)
            keys.extend(piece.keys)
            meta.extend(piece.meta)
            info = info or {k: v for k, v in piece.info.items() if k not in _PART_FIELDS}
    if not vectors:
        raise ValueError(f"{folder}: the embedding holds no vectors (every sample was skipped)")
    rows = sum(record["rows"] for record in records)
    if rows != len(keys):
        raise ValueError(f"{folder}: the done records count {rows} rows, the parts hold {len(keys)}")
    return Embeddings(vectors=torch.cat(vectors), keys=keys, meta=meta,
                      info={**info, "parts": sum(r["parts"] for r in records),
                            "world_size": world_size})


_PART_FIELDS = ("part", "rank", "stream_start", "stream_stop", "skipped")


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


@dataclass
class ReadReport:
    """What reading the data skipped, so a bulk job can say so instead of failing or hiding it.

    Attributes:
        skipped: one record per sample or shard that was not (fully) read:
            ``{"where": shard or path, "key": ... or None, "reason": ..., "position": n}``, where
            ``position`` is how many samples the stream had yielded before it.
        duplicate_keys: samples whose key appeared earlier in the same shard; both are kept, the
            later one renamed ``<key>~<n>`` (n = 1, 2, ...), so every key stays unique.
    """

    skipped: list[dict[str, Any]] = field(default_factory=list)
    duplicate_keys: int = 0


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {text}"


def iter_shard_samples(shards: Any, *, report: ReadReport | None = None
                       ) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """Yield ``(key, meta, jpeg bytes)`` of every sample in shard order (no decoding).

    Args:
        shards: what :func:`loaders.manifest.load_shard_set` reads.
        report: where unreadable shards (zero-byte, truncated, not a tar), samples without a
            ``.jpg`` and duplicate keys are recorded; the samples read before a shard broke are
            kept. Without it, an unreadable shard raises ValueError naming it and a duplicate
            key warns.

    Raises:
        ValueError: a shard cannot be read (only when ``report`` is None).
    """
    from loaders.manifest import load_shard_set
    from loaders.shard_reader import SHARD_ERRORS, shard_samples

    position = 0
    duplicates = 0
    for shard in load_shard_set(shards).shards:
        seen: dict[str, int] = {}
        try:
            for sample in shard_samples(shard.url):
                key, meta_bytes, jpeg = sample["__key__"], sample.get("json"), sample.get("jpg")
                if jpeg is None:
                    if report is not None:
                        report.skipped.append({"where": shard.url, "key": key, "position": position,
                                               "reason": "no .jpg member"})
                    continue
                meta = json.loads(meta_bytes) if meta_bytes else {"key": key}
                if key in seen:
                    seen[key] += 1
                    duplicates += 1
                    meta = {**meta, "duplicate_of": key}
                    key = f"{key}~{seen[key]}"
                else:
                    seen[key] = 0
                position += 1
                yield key, meta, jpeg
        except SHARD_ERRORS as error:
            if report is None:
                raise ValueError(f"{shard.url}: cannot read this shard ({_reason(error)}); "
                                 f"{position} samples were read before it") from error
            report.skipped.append({"where": shard.url, "key": None, "position": position,
                                   "reason": f"unreadable shard, the rest of it skipped "
                                             f"({_reason(error)})"})
    if report is not None:
        report.duplicate_keys += duplicates
    elif duplicates:
        import warnings

        warnings.warn(f"{duplicates} samples repeat a key of their shard; both were kept, the "
                      "later renamed <key>~<n>", stacklevel=2)


def iter_folder_samples(folder: str | os.PathLike, *, report: ReadReport | None = None
                        ) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """Yield ``(relative path, {"source": ...}, bytes)`` for every image under ``folder``."""
    folder = Path(folder)
    paths = list_image_files(folder)  # chosen by content, hidden files left out, as ecomaug shard does
    if not paths:
        raise ValueError(f"{folder}: no images in this folder (files are recognised by content)")
    position = 0
    for path in paths:
        relative = path.relative_to(folder).as_posix()
        data = _read_file(path, relative, position, report)
        if data is not None:
            position += 1
            yield relative, {"source": relative}, data


def _read_file(path: Path, key: str, position: int, report: ReadReport | None) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as error:
        if report is None:
            raise
        report.skipped.append({"where": str(path), "key": key, "position": position,
                               "reason": _reason(error)})
        return None


def iter_manifest_samples(manifest: str | os.PathLike, *, report: ReadReport | None = None
                          ) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """Yield the images a CSV / JSONL manifest lists (as ``ecomaug shard`` reads it) with its columns.

    The key is the path as written in the manifest; ``source`` holds it too. Relative paths are
    relative to the manifest.
    """
    from loaders.convert.inputs import read_inputs

    position = 0
    for item in read_inputs(manifest).items:
        data = _read_file(Path(item.path), item.identity, position, report)
        if data is not None:
            position += 1
            yield item.identity, {"source": item.identity, **item.meta}, data


def _kind(data: str | os.PathLike) -> str:
    """``"manifest"`` (.csv / .jsonl), ``"folder"`` (images, no shards) or ``"shards"``."""
    path = Path(data)
    if path.suffix.lower() in (".csv", ".jsonl", ".ndjson"):
        return "manifest"
    if path.is_dir() and not any(path.glob("manifest*.json")) and not any(path.glob("*.tar")):
        return "folder"
    return "shards"


def count_samples(data: str | os.PathLike) -> int | None:
    """How many images ``data`` holds, where known without reading them."""
    kind = _kind(data)
    if kind == "folder":
        return len(list_image_files(data))
    if kind == "manifest":
        from loaders.convert.inputs import read_inputs

        return len(read_inputs(data).items)
    from loaders.manifest import load_shard_set

    return load_shard_set(data).num_samples


def iter_data(data: str | os.PathLike, *, report: ReadReport | None = None
              ) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """Samples of shards (dir, manifest, tar, pattern, URL), a CSV/JSONL manifest or an image folder.

    Args:
        data: what to read.
        report: record what could not be read and go on (see :class:`ReadReport`); without it
            an unreadable shard or file raises.
    """
    kind = _kind(data)
    if kind == "manifest":
        return iter_manifest_samples(data, report=report)
    if kind == "folder":
        return iter_folder_samples(data, report=report)
    path = Path(data)
    if path.is_file() and path.suffix != ".tar" and path.name != "manifest.json" and \
            not path.name.startswith("manifest"):
        raise ValueError(f"{path}: not shards (.tar, manifest.json or a shard folder), a .csv / "
                         ".jsonl manifest, nor a folder of images")
    return iter_shard_samples(os.fspath(data), report=report)


def _where(data: str | os.PathLike) -> str:
    """``data`` as recorded in embeddings: absolute for a local path, as given for a URL."""
    text = os.fspath(data)
    return text if "://" in text or text.startswith("pipe:") else os.path.abspath(text)


def _is_shards(data: str | os.PathLike) -> bool:
    return _kind(data) == "shards"


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
    embeddings = embed_samples(model, iter_data(data), batch_size=batch_size, progress=progress,
                               total=count_samples(data), description="embed")
    embeddings.info["data"] = _where(data)  # where the images are, for thumbnails later
    return embeddings


@dataclass
class PartsReport:
    """What one rank of :func:`embed_to_parts` wrote.

    Attributes:
        folder: the parts folder.
        rank: this process's rank; world_size: how many ranks share the data.
        rows: vectors this rank holds in its parts (all runs together).
        parts: its part files; resumed_parts: how many of them an earlier run had written.
        seen: samples of this rank's share that were read (rows + skipped samples).
        skipped: records of what was not embedded (``skipped-r<rank>.jsonl`` holds them).
        duplicate_keys: rows whose key repeated an earlier one of the same shard (kept, renamed).
        dim: the vectors' width.
    """

    folder: Path
    rank: int
    world_size: int
    rows: int
    parts: int
    resumed_parts: int
    seen: int
    skipped: list[dict[str, Any]]
    duplicate_keys: int
    dim: int


def _part_info(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as data:
        return json.loads(str(data["info"]))


def embed_to_parts(model: EmbeddingModel, data: str | os.PathLike, out_dir: str | os.PathLike, *,
                   batch_size: int = 64, part_size: int = 4096, rank: int = 0,
                   world_size: int = 1, progress: bool = True) -> PartsReport:
    """Embed ``data`` into a folder of parts, written as they are computed and resumable.

    Memory stays at one part whatever the data's size. Rank ``r`` of ``world_size`` embeds the
    contiguous share ``[N*r // W, N*(r+1) // W)`` of the samples (the loaders' rank split,
    :func:`loaders.sharding.rank_range`) and writes ``part-r<rank>-<n>.npz`` (each covers
    ``part_size`` consecutive samples of its share, written atomically), then
    ``done-r<rank>-of-<W>.json``. Rerunning the same command after a kill keeps the finished
    parts and embeds the rest; :func:`load_embeddings` reads the folder as one set once every
    rank is done. Samples before a rank's share (or a resumed run's finished parts) are read
    but not decoded.

    Args:
        model: the backbone (on this rank's device).
        data: shards, a CSV/JSONL manifest or an image folder (see :func:`iter_data`).
        out_dir: the parts folder (created).
        batch_size: images per forward pass.
        part_size: samples per part.
        rank: this process's rank.
        world_size: how many processes share the data (needs a known sample count when > 1).
        progress: show a tqdm bar.

    Returns:
        A :class:`PartsReport`.

    Raises:
        ValueError: bad sizes or rank, an unknown sample count with several ranks, a folder
            holding parts of another model, data or split, or nothing to embed.
        DiskFullError: the disk filled up (no partial file is left).
    """
    from itertools import islice

    from tqdm.auto import tqdm

    from loaders.atomic import write_json_atomic
    from loaders.sharding import check_rank, rank_range

    check_rank(rank, world_size)
    if batch_size < 1 or part_size < 1:
        raise ValueError(f"batch_size and part_size must be >= 1; got {batch_size}, {part_size}")
    total = count_samples(data)
    if total is None and world_size > 1:
        raise ValueError(f"{data}: the number of samples is unknown (shards without a manifest or "
                         ".idx), so it cannot be split across {world_size} ranks")
    start, stop = rank_range(total, rank, world_size) if total is not None else (0, None)
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(20, "--out for parts must be a folder", str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    settings = {**model.info(), "data": _where(data), "world_size": world_size,
                "part_size": part_size, "stream_total": total}
    for other in folder.glob("done-r*-of-*.json"):
        if not other.name.endswith(f"-of-{world_size:05d}.json"):
            raise ValueError(f"{folder}: holds parts of a run split {int(other.stem.split('-of-')[1])} "
                             f"ways, not {world_size}; use another --out")
    for stale in folder.glob(f".part-r{rank:05d}-*.tmp.npz"):
        stale.unlink()  # left by a kill in the middle of a write
    done_parts, rows, duplicates, earlier_skipped = 0, 0, 0, []
    while (folder / PART_PATTERN.format(rank=rank, part=done_parts)).is_file():
        info = _part_info(folder / PART_PATTERN.format(rank=rank, part=done_parts))
        different = [k for k in settings if info.get(k) != settings[k]]
        if different:
            raise ValueError(f"{folder}: its parts were made with another {different[0]} "
                             f"({info.get(different[0])!r}, now {settings[different[0]]!r}); use "
                             "another --out or remove it")
        rows += info["rows"]
        duplicates += info["duplicates"]
        earlier_skipped.extend(info["skipped"])
        done_parts += 1
    resumed = done_parts
    report = ReadReport()
    position = start + done_parts * part_size
    stream = islice(iter_data(data, report=report), position, stop)
    bar = tqdm(total=None if stop is None else stop - start, initial=position - start,
               desc=f"embed r{rank}", unit="img", disable=not progress)
    dim = 0

    def write_part(first: int, last: int, chunks: list[torch.Tensor], keys: list[str],
                   meta: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> None:
        nonlocal done_parts, rows, duplicates
        width = chunks[0].shape[1] if chunks else dim
        vectors = torch.cat(chunks) if chunks else torch.zeros((0, width))
        dups = sum(1 for row in meta if "duplicate_of" in row)
        info = {**settings, "rank": rank, "part": done_parts, "stream_start": first,
                "stream_stop": last, "rows": len(keys), "duplicates": dups, "skipped": skipped}
        Embeddings(vectors=vectors, keys=keys, meta=meta, info=info).save(
            folder / PART_PATTERN.format(rank=rank, part=done_parts))
        done_parts += 1
        rows += len(keys)
        duplicates += dups

    part_start = position
    chunks: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    keys: list[str] = []
    meta: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for key, row, image in stream:
        try:
            pending.append(prepare(image, model.input_size))
            keys.append(key)
            meta.append(row)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            skipped.append({"where": row.get("source", key), "key": key, "position": position,
                            "reason": f"cannot decode ({_reason(error)})"})
        position += 1
        bar.update(1)
        if len(pending) == batch_size or position - part_start == part_size:
            if pending:
                chunks.append(model.embed(torch.stack(pending)).cpu())
                dim = chunks[-1].shape[1]
                pending = []
        if position - part_start == part_size:
            write_part(part_start, position, chunks, keys, meta, skipped)
            part_start, chunks, keys, meta, skipped = position, [], [], [], []
    if pending:
        chunks.append(model.embed(torch.stack(pending)).cpu())
        dim = chunks[-1].shape[1]
    if position > part_start:
        write_part(part_start, position, chunks, keys, meta, skipped)
    bar.close()
    last_rank = rank == world_size - 1
    read_skips = [record for record in report.skipped if record["position"] >= start and
                  (last_rank or stop is None or record["position"] < stop)]
    all_skipped = earlier_skipped + [s for p in range(resumed, done_parts) for s in
                                     _part_info(folder / PART_PATTERN.format(rank=rank, part=p))
                                     ["skipped"]] + read_skips
    if rows == 0 and world_size == 1:
        raise ValueError(f"{data}: no images to embed ({len(all_skipped)} skipped, see "
                         f"{folder}/skipped-r{rank:05d}.jsonl)" if all_skipped else
                         f"{data}: no images to embed")
    if not dim and rows:
        dim = _part_dim(folder, rank, done_parts)
    with open(folder / f"skipped-r{rank:05d}.jsonl", "w", encoding="utf-8") as stream_out:
        for record in all_skipped:
            stream_out.write(json.dumps(record, sort_keys=True) + "\n")
    seen = position - start
    write_json_atomic(folder / DONE_PATTERN.format(rank=rank, world_size=world_size),
                      {"rank": rank, "world_size": world_size, "rows": rows, "parts": done_parts,
                       "seen": seen, "skipped": len(all_skipped), "duplicate_keys": duplicates,
                       "dim": dim, **{k: settings[k] for k in ("model", "source", "data")}})
    return PartsReport(folder=folder, rank=rank, world_size=world_size, rows=rows,
                       parts=done_parts, resumed_parts=resumed, seen=seen, skipped=all_skipped,
                       duplicate_keys=duplicates, dim=dim)


def _part_dim(folder: Path, rank: int, parts: int) -> int:
    """The vectors' width in a rank's parts (a resumed run may compute none itself)."""
    for part in range(parts):
        with np.load(folder / PART_PATTERN.format(rank=rank, part=part), allow_pickle=False) as data:
            if data["vectors"].shape[0]:
                return int(data["vectors"].shape[1])
    return 0


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

