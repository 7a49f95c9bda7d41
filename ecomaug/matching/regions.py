"""B's listings by their item regions (``ecomaug match --query-regions``): a bundle photo is searched
as its whole image and as each item it shows, so an A item can pair with one region of it.

Each listing of B whose image shows several items, or one item small in its frame
(:func:`ecomaug.evaluation.proposals.find_items`: the blobs that stand out from its backdrop, or
the lone item's tight box, with ``"items"``; layout cells with ``"grid"``) gets a vector per
region, which remembers its listing and its box. A is searched against B's listings followed by
their regions (:class:`SearchRows`), and every A listing's neighbours are collapsed back to
listings, each by its best row (:func:`collapse`): a bundle appears once among an A item's
neighbours, through the region that shows it, and once per region across A's items. Region rows
get background levels in A as listings do, so the normalised score holds for them too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ecomaug.evaluation.proposals import (FRAMED_SHARE, ITEM_MARGIN, ITEM_TOLERANCES, LISTING_BACKDROP_SHARE,
                                         LONE_ITEM_AREA, MAX_ITEMS, PROPOSAL_SIDE)
from ecomaug.evaluation.regions import crop_regions, region_parts
from ecomaug.matching.search import SearchResult, fingerprint

if TYPE_CHECKING:
    from ecomaug.evaluation.embed import EmbeddingModel, Embeddings
    from ecomaug.matching.normalise import Scores

WHOLE = "whole"  # pairs.csv's b_region of a pair found through the listing's whole image


@dataclass
class ListingRegions:
    """The item regions of a catalogue's listings (the whole image is the listing's own vector).

    Attributes:
        mode: ``"items"`` or ``"grid"``.
        vectors: unit rows, one per region.
        rows: the catalogue row (listing) of each region.
        boxes: each region's ``(left, top, right, bottom)`` in the listing's pixels.

    Shape:
        - vectors: :math:`(M, D)`; rows: :math:`(M,)`; boxes: :math:`(M, 4)`.
    """

    mode: str
    vectors: torch.Tensor
    rows: np.ndarray
    boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def labels(self) -> list[str]:
        """Each region as pairs.csv names it: ``left,top,right,bottom`` in pixels."""
        return [",".join(str(int(v)) for v in box) for box in self.boxes]


@dataclass
class SearchRows:
    """The rows A is searched against with item regions: B's listings, then their regions.

    Attributes:
        listings: how many listings lead (row ``i < listings`` is listing ``i``'s whole image).
        owner: each row's listing.
        labels: each row's region (:data:`WHOLE` for a listing's own row).
        most: the most rows one listing has (its whole image and its regions).
    """

    listings: int
    owner: np.ndarray
    labels: list[str]
    most: int

    def keys(self, listing_keys: list[str]) -> list[str]:
        """Each row's key: its listing's, with ``#box`` for a region."""
        return [listing_keys[owner] + ("" if label == WHOLE else f"#{label}")
                for owner, label in zip(self.owner.tolist(), self.labels)]


def search_rows(listings: int, regions: ListingRegions) -> SearchRows:
    """B's search rows: ``listings`` whole images, then ``regions`` in their order."""
    owner = np.concatenate([np.arange(listings), regions.rows]).astype(np.int64)
    most = int(np.bincount(owner, minlength=listings).max()) if listings else 1
    return SearchRows(listings=listings, owner=owner, labels=[WHOLE] * listings + regions.labels(), most=most)


def embed_listing_regions(model: "EmbeddingModel", data: str | None, keys: list[str], vectors: torch.Tensor,
                          mode: str, *, name: str, work_dir: str | os.PathLike, batch_size: int = 64,
                          progress: bool = True) -> ListingRegions:
    """Embed the item regions of every listing of a catalogue (its images read again from ``data``).

    The result is kept in ``work_dir/embeddings/<name>-regions-<mode>.npz`` and reused by a rerun
    with the same model, data and listings.

    Args:
        model: the backbone the catalogue was embedded with.
        data: where the listings' images are (shards, a manifest or a folder).
        keys: the listings' keys, in the catalogue's order; their images elsewhere are skipped.
        vectors: the listings' vectors (with ``keys``, what identifies the listings for reuse).
        mode: ``"items"`` or ``"grid"``.
        name: the catalogue's name (``"b"``), for the file and the messages.
        work_dir: the match's output directory.
        batch_size: crops per forward pass.
        progress: show a progress bar.

    Raises:
        ValueError: a bad ``mode``, or a catalogue whose images are not known.

    Shape:
        - vectors: :math:`(N, D)`; the result's: :math:`(M, D)`, M regions in all.
    """
    from tqdm.auto import tqdm

    from ecomaug.evaluation.embed import Embeddings, ReadReport, iter_data, load_embeddings
    from loaders.convert.hygiene import read_image
    from loaders.torch_backend import DECODE_ERRORS

    if mode not in ("items", "grid"):
        raise ValueError(f"listing regions are 'items' or 'grid'; got {mode!r}")
    if data is None:
        raise ValueError(f"--query-regions {mode}: where --{name}'s images are is not known")
    info = _cache_info(model, data, mode, keys, vectors)
    cached = Path(work_dir) / "embeddings" / f"{name}-regions-{mode}.npz"
    try:
        kept = load_embeddings(cached) if cached.is_file() else None
    except ValueError:  # a damaged cache is embedded again
        kept = None
    if kept is not None and kept.info == info:
        return _from_embeddings(kept, mode, dim=vectors.shape[1])
    row_of = {key: row for row, key in enumerate(keys)}
    embedded, rows, boxes, crops = [], [], [], []

    def flush() -> None:
        embedded.append(model.embed(torch.cat(crops)).float().cpu())
        crops.clear()

    samples = iter_data(data, report=ReadReport())
    for key, _, encoded in tqdm(samples, total=len(keys), desc=f"{name} regions", unit="img",
                                disable=not progress):
        row = row_of.pop(key, None)
        if row is None:
            continue  # not embedded (it did not decode) or a repeated key
        try:
            image = read_image(bytes(encoded))  # as the whole image was read
        except DECODE_ERRORS:
            continue
        found, cropped = region_parts(image, mode=mode)  # the whole image is the listing's own row
        if not found:
            continue
        crops.append(crop_regions(image, cropped, model.input_size))
        rows += [row] * len(found)
        boxes += found
        if sum(len(c) for c in crops) >= batch_size:
            flush()
    if crops:
        flush()
    stacked = torch.cat(embedded) if embedded else torch.zeros(0, vectors.shape[1])
    regions = ListingRegions(mode=mode, vectors=torch.nn.functional.normalize(stacked, dim=1),
                             rows=np.asarray(rows, dtype=np.int64),
                             boxes=np.asarray(boxes, dtype=np.int64).reshape(-1, 4))
    Embeddings(vectors=regions.vectors, keys=[f"{keys[r]}#{label}" for r, label in
                                              zip(regions.rows.tolist(), regions.labels())],
               meta=[{"row": int(r), "box": [int(v) for v in box]} for r, box in zip(regions.rows, regions.boxes)],
               info=info).save(cached)
    return regions


def _cache_info(model: "EmbeddingModel", data: str, mode: str, keys: list[str], vectors: torch.Tensor
                ) -> dict[str, object]:
    """What identifies a catalogue's regions for reuse: the model, the listings and how regions were found."""
    info = {**model.info(), "data": data, "mode": mode, "margin": ITEM_MARGIN if mode == "items" else 0.0,
            "listings": fingerprint(keys, vectors)}
    if mode == "items":  # a cache from other proposals is embedded again
        info["proposals"] = {"tolerances": list(ITEM_TOLERANCES), "max_items": MAX_ITEMS, "framed": FRAMED_SHARE,
                             "lone_item_area": LONE_ITEM_AREA, "listing_backdrop": LISTING_BACKDROP_SHARE,
                             "proposal_side": PROPOSAL_SIDE}
    return info


def _from_embeddings(kept: "Embeddings", mode: str, *, dim: int) -> ListingRegions:
    vectors = kept.vectors.float() if len(kept.keys) else torch.zeros(0, dim)
    return ListingRegions(mode=mode, vectors=torch.nn.functional.normalize(vectors, dim=1),
                          rows=np.asarray([m["row"] for m in kept.meta], dtype=np.int64),
                          boxes=np.asarray([m["box"] for m in kept.meta], dtype=np.int64).reshape(-1, 4))


def collapse(result: SearchResult, owner: np.ndarray, k: int) -> SearchResult:
    """Each query's ``k`` best listings, each once, by its best row (search order: cosine).

    Args:
        result: a search over rows that belong to listings (several rows per listing).
        owner: each row's listing.
        k: listings kept per query (``-1`` / ``-inf`` pad a query with fewer).

    Returns:
        The same search with every listing's lower rows dropped; indices are still rows.

    Shape:
        - result's arrays: :math:`(Q, k')`; output's: :math:`(Q, k)`.
    """
    indices, scores = result.indices, result.scores
    listing = np.where(indices >= 0, owner[np.maximum(indices, 0)], -1)
    by_listing = np.argsort(listing, axis=1, kind="stable")  # a listing's rows together, best first
    sorted_listing = np.take_along_axis(listing, by_listing, axis=1)
    first = np.ones_like(sorted_listing, dtype=bool)
    first[:, 1:] = sorted_listing[:, 1:] != sorted_listing[:, :-1]
    keep = np.zeros_like(first)
    np.put_along_axis(keep, by_listing, first, axis=1)
    keep &= indices >= 0
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept rows first, in score order
    kept = np.take_along_axis(keep, order, axis=1)
    width = order.shape[1]
    indices = np.where(kept, np.take_along_axis(indices, order, axis=1), -1)
    scores = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf).astype(result.scores.dtype)
    if width < k:
        indices = np.pad(indices, ((0, 0), (0, k - width)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, k - width)), constant_values=-np.inf)
    return SearchResult(scores=scores, indices=indices, method=result.method, info=result.info)


def labelled_best(scored: "Scores", score: str, a_vectors: torch.Tensor, b_vectors: torch.Tensor,
                  a_rows: np.ndarray, b_rows: np.ndarray, rows: SearchRows | None) -> np.ndarray:
    """Labelled pairs' scores (calibration): with regions, a B listing's best over its rows.

    Shape:
        - a_rows, b_rows (listings): :math:`(L,)`; b_vectors: one per search row; output :math:`(L,)`.
    """
    if rows is None:
        return scored.labelled(score, a_vectors, b_vectors, a_rows, b_rows)
    order = np.argsort(rows.owner, kind="stable")
    counts = np.bincount(rows.owner, minlength=rows.listings)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pair = np.repeat(np.arange(len(b_rows)), counts[b_rows])
    offset = np.arange(len(pair)) - np.repeat(np.cumsum(counts[b_rows]) - counts[b_rows], counts[b_rows])
    entries = order[starts[b_rows][pair] + offset]
    best = np.full(len(b_rows), -np.inf, dtype=np.float64)
    np.maximum.at(best, pair, scored.labelled(score, a_vectors, b_vectors, a_rows[pair], entries))
    return best.astype(np.float32)
