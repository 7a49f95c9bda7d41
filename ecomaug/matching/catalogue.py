"""A catalogue to match: its embeddings, keys and metadata, from data (embedded here) or from embed.

A catalogue is given as shards, an image folder or a CSV/JSONL manifest (embedded with the model
into a resumable parts folder under the output directory), or as what ``ecomaug embed`` wrote
(a ``.npz`` or a parts folder; no model needed then).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ecomaug.evaluation.embed import (EmbeddingModel, Embeddings, embed_to_parts, iter_data,
                                      is_parts_folder, load_embeddings)
from ecomaug.evaluation.regions import QUERY_REGIONS
from ecomaug.matching.regions import ListingRegions, embed_listing_regions

# Metadata a sample carries for the loaders' sake, not the user's columns.
INTERNAL_COLUMNS = ("key", "width", "height", "duplicate_of")


@dataclass
class Catalogue:
    """One side of a match.

    Attributes:
        name: ``"a"`` or ``"b"``.
        embeddings: vectors (L2-normalised here), keys and metadata.
        source: what the user passed.
        data: where its images are (for thumbnails), when known.
        read: how reading its images went (:func:`~ecomaug.evaluation.sources.read_counts`),
            when known; skipped_file: where the samples not embedded are listed.
        regions: its listings' item regions (:mod:`ecomaug.matching.regions`), when asked for.

    Shape:
        - embeddings.vectors: :math:`(N, D)` float32, unit rows.
    """

    name: str
    embeddings: Embeddings
    source: str
    data: str | None
    read: dict[str, int | None] | None = None
    skipped_file: str | None = None
    regions: ListingRegions | None = None

    def __len__(self) -> int:
        return len(self.embeddings.keys)

    @property
    def vectors(self) -> torch.Tensor:
        return self.embeddings.vectors

    @property
    def keys(self) -> list[str]:
        return self.embeddings.keys

    @property
    def meta(self) -> list[dict[str, Any]]:
        return self.embeddings.meta

    def columns(self) -> list[str]:
        """The metadata columns of its rows, in first-seen order (loader-internal ones left out)."""
        seen: dict[str, None] = {}
        for row in self.meta:
            seen.update(dict.fromkeys(k for k in row if k not in INTERNAL_COLUMNS))
        return list(seen)

    def positions(self) -> dict[str, int]:
        """Row of each key, and of each ``source`` path as given in the input."""
        position: dict[str, int] = {}
        for row, (key, meta) in enumerate(zip(self.keys, self.meta)):
            source = meta.get("source")
            if source is not None:
                position.setdefault(str(source), row)
        for row, key in enumerate(self.keys):
            position[key] = row  # a key wins over a path that happens to read the same
        return position


def is_embeddings(source: str | os.PathLike) -> bool:
    """Whether ``source`` is what ``ecomaug embed`` wrote (a ``.npz`` or a parts folder)."""
    path = Path(source)
    return (path.is_file() and path.suffix == ".npz") or is_parts_folder(path)


def check_region_source(source: str, mode: str, *, name: str = "b") -> None:
    """Refuse item regions (``match --query-regions``) of what ``ecomaug embed`` wrote: no pixels.

    Raises:
        ValueError: an unknown ``mode``, or regions asked of an embeddings output.
    """
    if mode not in QUERY_REGIONS:
        raise ValueError(f"--query-regions must be one of {', '.join(QUERY_REGIONS)}; got {mode!r}")
    if mode != "none" and is_embeddings(source):
        raise ValueError(f"--query-regions {mode} embeds --{name}'s item regions from its images, but "
                         f"{source} holds embeddings (no pixels): pass its shards, folder or manifest")


def check_source(source: str | os.PathLike, *, name: str) -> str:
    """``source`` as text, once it is known to exist (local paths; URLs and patterns pass).

    Raises:
        FileNotFoundError: a local path that does not exist.
    """
    text = os.fspath(source)
    if "://" not in text and "{" not in text and not Path(text).exists():
        raise FileNotFoundError(2, f"No such catalogue (--{name})", text)
    return text


def load_catalogue(source: str | os.PathLike, *, name: str, model: EmbeddingModel | None,
                   work_dir: str | os.PathLike, batch_size: int = 64, part_size: int = 4096,
                   progress: bool = True, regions: str = "none") -> Catalogue:
    """Read embeddings, or embed the images of ``source`` into ``work_dir/embeddings/<name>``.

    Embedding is resumable: a rerun after a kill keeps the finished parts.

    Args:
        source: shards / image folder / CSV or JSONL manifest, or an ``ecomaug embed`` output.
        name: ``"a"`` or ``"b"`` (names the parts folder and the messages).
        model: the backbone; needed unless ``source`` is an embeddings output.
        work_dir: the match's output directory.
        batch_size: images per forward pass.
        part_size: samples per part file.
        progress: show a progress bar.
        regions: ``"none"``, or ``"items"`` / ``"grid"``: also embed each listing's item regions
            (``match --query-regions``), kept in ``work_dir/embeddings/<name>-regions-<mode>.npz``.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: no model for images, an empty catalogue, or regions of embeddings (no pixels).
    """
    text = check_source(source, name=name)
    check_region_source(text, regions, name=name)
    if is_embeddings(text):
        embeddings = load_embeddings(text)
        data = embeddings.info.get("data")
        path = Path(text)
        listed = (path / "skipped-r*.jsonl") if path.is_dir() else path.with_suffix(".skipped.jsonl")
    else:
        if model is None:
            raise ValueError(f"--{name} {text} holds images; give --model to embed them (or pass "
                             "what ecomaug embed wrote)")
        folder = Path(work_dir) / "embeddings" / name
        report = embed_to_parts(model, text, folder, batch_size=batch_size, part_size=part_size,
                                progress=progress)
        embeddings = load_embeddings(folder)
        data, listed = text, report.skipped_file
    if not embeddings.keys:
        raise ValueError(f"--{name} {text}: the catalogue is empty")
    vectors = torch.nn.functional.normalize(embeddings.vectors.float(), dim=1)
    embeddings = Embeddings(vectors=vectors, keys=embeddings.keys, meta=embeddings.meta,
                            info=embeddings.info)
    catalogue = Catalogue(name=name, embeddings=embeddings, source=text, data=data,
                          read=embeddings.info.get("read"), skipped_file=str(listed))
    if regions != "none":
        catalogue.regions = embed_listing_regions(model, data, catalogue.keys, catalogue.vectors, regions,
                                                  name=name, work_dir=work_dir, batch_size=batch_size,
                                                  progress=progress)
    return catalogue


def check_compatible(a: Catalogue, b: Catalogue) -> None:
    """Both sides must come from one embedding: the same width and, where recorded, model.

    Raises:
        ValueError: they differ.
    """
    if a.vectors.shape[1] != b.vectors.shape[1]:
        raise ValueError(f"the catalogues' embeddings differ in width: --a has {a.vectors.shape[1]}, "
                         f"--b has {b.vectors.shape[1]}; embed both with one model")
    model_a, model_b = a.embeddings.info.get("model"), b.embeddings.info.get("model")
    source_a, source_b = a.embeddings.info.get("source"), b.embeddings.info.get("source")
    if model_a and model_b and (model_a, source_a) != (model_b, source_b):
        raise ValueError(f"the catalogues were embedded by different models: --a by {model_a} "
                         f"({source_a}), --b by {model_b} ({source_b}); embed both with one model")


def read_images(catalogue: Catalogue, keys: Iterable[str]) -> dict[str, bytes]:
    """The encoded images of ``keys``, read in one pass over the catalogue's data (if still there)."""
    wanted = set(keys)
    found: dict[str, bytes] = {}
    if not wanted or catalogue.data is None:
        return found
    data = catalogue.data
    if "://" not in data and not Path(data).exists():
        return found
    from ecomaug.evaluation.embed import ReadReport

    for key, _, image in iter_data(data, report=ReadReport()):
        if key in wanted:
            found[key] = image
            if len(found) == len(wanted):
                break
    return found
