"""Query-time item regions: match a multi-item image by its best-matching region.

A bundle photo shows the wanted item among others; its whole-image embedding averages them all and
matches none. Keeping, for every gallery entry, the best score over the image's regions finds it.

Two ways to find the regions (``query_regions``):

* ``"items"``: the item proposals of :mod:`ecomaug.evaluation.proposals` (the blobs that stand out
  from the backdrop, or a lone item's tight box when it fills little of its frame), each grown by
  a margin before it is cropped.
* ``"grid"``: every cell of the layouts multi-item listings use (2 and 3 side by side or stacked,
  2 x 2, 3 x 2, 2 x 3). Measured worse: half-items and empty cells match wrong items too well.

The whole image is always a region. Each region is padded to a square with the image's border
colour (an item keeps its aspect ratio, as in the gallery), then resized to the model's input.

A query is ranked by its best region, each region's cosines normalised against its own
background level in the gallery (:mod:`ecomaug.evaluation.background`, as ``match`` normalises its
regions' scores): a companion item that is not in the gallery is close to many gallery items at once and
stands out from none, where the wanted item stands out from its neighbours.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image

from ecomaug.evaluation.background import BACKGROUND_RANKS, FLOOR, background_levels
from ecomaug.evaluation.proposals import MAX_ITEMS, border_colour, find_items
from ecomaug.evaluation.retrieval import RetrievalResult, encode_labels, first_hit_ranks, ranking_average_precision

if TYPE_CHECKING:
    from ecomaug.evaluation.embed import EmbeddingModel

# (columns, rows) of each layout; (1, 1) is the whole image.
GRIDS: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (1, 2), (3, 1), (1, 3), (2, 2), (3, 2), (2, 3))
QUERY_REGIONS = ("none", "items", "grid")


def region_boxes(width: int, height: int, grids: Sequence[tuple[int, int]] = GRIDS
                 ) -> list[tuple[int, int, int, int]]:
    """The ``(left, top, right, bottom)`` boxes of every cell of every layout, whole image first."""
    boxes = []
    for columns, rows in grids:
        if columns < 1 or rows < 1:
            raise ValueError(f"a layout needs >= 1 column and row, got {(columns, rows)}")
        for row in range(rows):
            for column in range(columns):
                boxes.append((column * width // columns, row * height // rows,
                              (column + 1) * width // columns, (row + 1) * height // rows))
    return boxes


def region_count(mode: str, grids: Sequence[tuple[int, int]] = GRIDS) -> int:
    """Regions per image for ``mode`` (``"items"`` pads to a fixed count with the whole image)."""
    if mode == "items":
        return 1 + MAX_ITEMS
    if mode == "grid":
        return len(region_boxes(8, 8, grids))
    raise ValueError(f"query regions must be 'items' or 'grid'; got {mode!r}")


def image_regions(image: Image.Image, grids: Sequence[tuple[int, int]] = GRIDS, *,
                  mode: str = "grid") -> list[tuple[int, int, int, int]]:
    """The ``(left, top, right, bottom)`` regions of ``image``, the whole image first, then its
    :func:`region_parts`."""
    return [(0, 0, *image.size)] + region_parts(image, grids, mode=mode)[0]


def region_parts(image: Image.Image, grids: Sequence[tuple[int, int]] = GRIDS, *, mode: str = "grid"
                 ) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int, int, int]]]:
    """The regions of ``image`` besides the whole image, and the box to crop for each.

    With ``mode="items"``: the items it shows, each cropped grown by its margin
    (:func:`ecomaug.evaluation.proposals.find_items`); with ``mode="grid"``: every cell of every
    layout of ``grids`` but the whole image, cropped as it is (a cell grown would show its neighbours).
    """
    if mode == "items":
        return find_items(image)
    if mode == "grid":
        cells = region_boxes(*image.size, grids)[1:]
        return cells, cells
    raise ValueError(f"query regions must be 'items' or 'grid'; got {mode!r}")


def crop_regions(image: Image.Image, boxes: Sequence[tuple[int, int, int, int]], size: int) -> torch.Tensor:
    """Each box of ``image`` as a ``size`` square: padded with the border colour, then resized.

    Shape:
        - output: :math:`(len(boxes), 3, size, size)` uint8.
    """
    from ecomaug.evaluation.embed import prepare

    image = image.convert("RGB")
    fill = border_colour(np.asarray(image))
    crops = []
    for box in boxes:
        cell = image.crop(box)
        side = max(cell.size)
        square = Image.new("RGB", (side, side), fill)
        square.paste(cell, ((side - cell.width) // 2, (side - cell.height) // 2))
        crops.append(prepare(square, size))
    return torch.stack(crops)


def region_crops(image: Image.Image | bytes, size: int, grids: Sequence[tuple[int, int]] = GRIDS,
                 *, mode: str = "grid") -> torch.Tensor:
    """Every region of ``image`` (:func:`image_regions`) as a ``size`` square (:func:`crop_regions`), the
    whole image as it is, the others as :func:`region_parts` crops them.

    With ``mode="items"`` R varies from image to image (1 to ``1 + MAX_ITEMS``).

    Shape:
        - output: :math:`(R, 3, size, size)` uint8, the whole image first.
    """
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    image = image.convert("RGB")
    return crop_regions(image, [(0, 0, *image.size)] + region_parts(image, grids, mode=mode)[1], size)


def embed_regions(model: "EmbeddingModel", samples: Sequence[tuple[str, dict, bytes]], *,
                  batch_size: int = 64, grids: Sequence[tuple[int, int]] = GRIDS, mode: str = "grid",
                  progress: bool = False, description: str = "regions") -> torch.Tensor:
    """Embed every region of every sample.

    An image with fewer regions than :func:`region_count` is padded with its whole-image
    embedding, which leaves its best score unchanged (and is not embedded twice).

    Shape:
        - output: :math:`(Q, R, D)` float32 on the model's device, R = :func:`region_count`.
    """
    from tqdm.auto import tqdm

    per_query = region_count(mode, grids)
    vectors, pending = [], []
    chunk = max(1, batch_size // per_query)

    def flush() -> None:
        embedded = model.embed(torch.cat(pending)).split([len(crops) for crops in pending])
        for regions in embedded:  # R_i x D, whole image first
            vectors.append(torch.cat([regions, regions[:1].expand(per_query - len(regions), -1)]))
        pending.clear()

    for _, _, data in tqdm(samples, desc=description, unit="img", disable=not progress):
        pending.append(region_crops(data() if callable(data) else data, model.input_size, grids, mode=mode))
        if len(pending) == chunk:
            flush()
    if pending:
        flush()
    return torch.stack(vectors)


def retrieve_regions(region_embeddings: torch.Tensor, query_items: Sequence[object], gallery_emb: torch.Tensor,
                     gallery_items: Sequence[object], *, depth: int = 10, query_chunk: int = 256,
                     normalised: bool = True) -> RetrievalResult:
    """Rank the gallery for every query by its best region: ``score(q, g) = max_r s(region_r(q), g)``.

    ``s`` is the cosine normalised by the region's background level in the gallery
    (:func:`ecomaug.evaluation.background.normalise`), or the raw cosine with ``normalised=False``.
    A query with one region ranks the gallery as its whole image does. (``match`` averages in the
    gallery side's level too; here that re-ranked plain queries as well, and cost watermarked ones
    0.016 R@1 on the benchmark.) Exact, in chunks of queries; average precision over the whole
    ranking.

    Shape:
        - region_embeddings: :math:`(Q, R, D)`; gallery_emb: :math:`(G, D)`.
    """
    if region_embeddings.ndim != 3 or gallery_emb.ndim != 2 or region_embeddings.shape[-1] != gallery_emb.shape[-1]:
        raise ValueError(f"expected Q x R x D region embeddings and a G x D gallery, got "
                         f"{tuple(region_embeddings.shape)} and {tuple(gallery_emb.shape)}")
    if len(query_items) != region_embeddings.shape[0] or len(gallery_items) != gallery_emb.shape[0]:
        raise ValueError("one item id per query and per gallery entry is needed")
    regions = torch.nn.functional.normalize(region_embeddings.float(), dim=-1)
    gallery = torch.nn.functional.normalize(gallery_emb.float().to(regions.device), dim=-1)
    query_codes, gallery_codes = encode_labels(query_items, gallery_items)
    if depth < 1:
        raise ValueError(f"depth must be >= 1; got {depth}")
    found = min(depth, gallery.shape[0])  # a small gallery pads the ranking with -1 / -inf
    gallery_codes_t, query_codes_t = torch.from_numpy(gallery_codes), torch.from_numpy(query_codes)
    indices, scores, average_precision = [], [], []
    for start in range(0, regions.shape[0], query_chunk):
        block = torch.einsum("qrd,gd->qrg", regions[start:start + query_chunk], gallery)  # Qc x R x G
        if normalised and gallery.shape[0]:
            block = _normalise_block(block)
        block = block.amax(dim=1).cpu()  # Qc x G
        top_scores, top_indices = torch.topk(block, k=found, dim=1)
        padding = depth - found
        indices.append(torch.nn.functional.pad(top_indices, (0, padding), value=-1))
        scores.append(torch.nn.functional.pad(top_scores, (0, padding), value=float("-inf")))
        order = torch.argsort(block, dim=1, descending=True)  # Qc x G
        hits = gallery_codes_t[order] == query_codes_t[start:start + query_chunk, None]  # Qc x G, the whole ranking
        average_precision.append(ranking_average_precision(hits, hits.sum(dim=1)))
    topk_indices = torch.cat(indices).numpy()
    return RetrievalResult(topk_indices=topk_indices, topk_scores=torch.cat(scores).numpy(),
                           first_hit_rank=first_hit_ranks(topk_indices, query_codes, gallery_codes),
                           average_precision=torch.cat(average_precision).numpy(),
                           has_relevant=np.isin(query_codes, gallery_codes))


def _normalise_block(block: torch.Tensor) -> torch.Tensor:
    """Region cosines (Qc x R x G) normalised by each region's own background level in the gallery
    (:func:`ecomaug.evaluation.background.normalise` with both levels the region's), on their device."""
    queries, regions, entries = block.shape
    neighbours = torch.topk(block, k=min(BACKGROUND_RANKS[1], entries), dim=2).values.cpu()
    level = background_levels(neighbours.reshape(queries * regions, -1).numpy()).reshape(queries, regions, 1)
    level = torch.from_numpy(level).to(block.device)
    return (block - level) / (1.0 - level).clamp_min(FLOOR)
