"""Query-time item regions: match a multi-item image by its best-matching region.

A bundle photo shows the wanted item among others; its whole-image embedding averages them all and
matches none. Keeping, for every gallery entry, the best score over the image's regions finds it.

Two ways to find the regions (``query_regions``):

* ``"items"`` (class-agnostic proposals): the connected blobs that stand out from the image's
  border colour (the backdrop a bundle's items are laid out on), each blob's box a region, found
  at a coarse and a fine colour tolerance (a pale photo on a pale backdrop only stands out at
  the fine one, touching items only come apart at the coarse one). An image with fewer than two
  such blobs shows one item: when that item fills less than :data:`LONE_ITEM_AREA` of the frame
  (a listing photographed at an angle, or from afar) its tight box is the one extra region
  (:func:`lone_item_box`), which brings it to the scale the gallery shows it at; otherwise the
  whole image is its only region. Each box, found on a copy at most :data:`PROPOSAL_SIDE` pixels
  long whatever the photo's size, is grown by :data:`ITEM_MARGIN` before it is cropped.
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

import cv2
import numpy as np
import torch
from PIL import Image

from ecomaug.evaluation.background import BACKGROUND_RANKS, FLOOR, background_levels
from ecomaug.evaluation.retrieval import RetrievalResult, encode_labels, first_hit_ranks, ranking_average_precision

if TYPE_CHECKING:
    from ecomaug.evaluation.embed import EmbeddingModel

# (columns, rows) of each layout; (1, 1) is the whole image.
GRIDS: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (1, 2), (3, 1), (1, 3), (2, 2), (3, 2), (2, 3))
QUERY_REGIONS = ("none", "items", "grid")
MAX_ITEMS = 12  # proposals kept per image, the largest first
# Colour tolerances of item_boxes. On the benchmark's 640 bundles a box overlaps the wanted tile by IoU >= 0.5
# for 74 % at 30 alone, 91 % with 10 added; single-item queries get regions no more often (20-30 %).
ITEM_TOLERANCES = (30, 10)
# Boxes overlapping a larger one by this IoU or more are the same blob found twice.
SAME_BOX_IOU = 0.8
# An item box is grown by this share of its width and height on each side (a blob's box cuts the item edge
# to edge; product photos leave a margin). On bundles of the sample's items (docs/matching.md) the median
# cosine of an item to its own photo goes 0.87 -> 0.91, the 10th percentile 0.70 -> 0.82.
ITEM_MARGIN = 0.2
# A box whose outline stands out from the backdrop over this share of its length is a whole photo
# pasted in (a collage tile), which carries its own margin: it is not grown.
FRAMED_SHARE = 0.9
# A lone item whose tight box covers less than this share of its image gets that box as a region. On the
# benchmark's perspective queries (640, 224 + 128 px) R@1 0.566 -> 0.759 for frozen Lite0, 0.820 -> 0.866 for
# its `ecom` fine-tune, others within 0.003 (docs/finetune.md#lone-items); shares 0.3-0.9 do as well.
LONE_ITEM_AREA = 0.5
# A colour (in steps of 16 a channel) making up this share of the content is the listing's own backdrop:
# the lone item is what stands out from it too.
LISTING_BACKDROP_SHARE = 0.3
# Items are found and grown on a copy at most this long (`ecomaug shard --max-size`'s default, where every
# figure above was measured), boxes mapped back: an 18 MP photo's regions take 0.12 s, not 3.9 s.
PROPOSAL_SIDE = 384


def item_boxes(image: Image.Image, *, tolerances: Sequence[int] = ITEM_TOLERANCES, min_area: float = 0.02,
               max_items: int = MAX_ITEMS) -> list[tuple[int, int, int, int]]:
    """Class-agnostic item proposals: boxes of the blobs that differ from the border colour.

    At each tolerance, a pixel is foreground when one of its channels differs from the border's
    median colour by more than it; a 3 x 3 opening drops specks and thin text strokes; each
    8-connected blob whose box covers at least ``min_area`` of the image is one proposal. The
    finer tolerances are tried only when the coarsest finds two blobs or more (a single item's
    shading would split at them); the proposals of all tried are pooled, and a box that overlaps
    a larger one by :data:`SAME_BOX_IOU` or more is dropped.

    Returns:
        ``(left, top, right, bottom)`` boxes, the largest first; fewer than two means "one item".
    """
    distance = _backdrop_distance(image)
    height, width = distance.shape
    found: list[tuple[int, int, int, int]] = []
    for tolerance in sorted(tolerances, reverse=True):
        mask = cv2.morphologyEx((distance > tolerance).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        found += [(int(x), int(y), int(x + w), int(y + h)) for x, y, w, h, _ in stats[1:]
                  if w * h >= min_area * width * height]
        if len(found) < 2:  # one item at the coarsest tolerance: a finer one would only split its shading
            break
    found.sort(key=lambda box: -(box[2] - box[0]) * (box[3] - box[1]))
    boxes: list[tuple[int, int, int, int]] = []
    for box in found:
        if all(_iou(box, kept) < SAME_BOX_IOU for kept in boxes):
            boxes.append(box)
    return boxes[:max_items]


def lone_item_box(image: Image.Image, *, tolerance: int = max(ITEM_TOLERANCES), min_area: float = 0.02,
                  max_area: float = LONE_ITEM_AREA) -> tuple[int, int, int, int] | None:
    """The tight box of a lone item that fills little of its image, or None.

    The content is what stands out from the border's median colour by more than ``tolerance``
    (as in :func:`item_boxes`). A listing photographed at an angle shows its own backdrop inside
    that content: when one colour makes up :data:`LISTING_BACKDROP_SHARE` of it, the item is what
    stands out from that colour as well. After a 3 x 3 opening, the box round all of the item's
    pixels (a multi-part item stays whole) is returned if it covers at least ``min_area`` and
    less than ``max_area`` of the image.
    """
    pixels = _signed_pixels(image)
    stands_out = _distance(pixels, _border_colour(pixels)) > tolerance
    content = pixels[stands_out]
    if len(content):
        steps = content // 16
        codes = steps[:, 0] * 256 + steps[:, 1] * 16 + steps[:, 2]
        counts = np.bincount(codes, minlength=16 ** 3)
        if counts.max() >= LISTING_BACKDROP_SHARE * len(content):
            backdrop = np.median(content[codes == counts.argmax()], axis=0)
            stands_out &= _distance(pixels, backdrop) > tolerance
    mask = cv2.morphologyEx(stands_out.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    rows, columns = np.nonzero(mask)
    if not len(rows):
        return None
    box = (int(columns.min()), int(rows.min()), int(columns.max()) + 1, int(rows.max()) + 1)
    area = (box[2] - box[0]) * (box[3] - box[1]) / (image.width * image.height)
    return box if min_area <= area < max_area else None


def _backdrop_distance(image: Image.Image) -> np.ndarray:
    """Each pixel's largest channel difference from the border's median colour (H x W)."""
    pixels = _signed_pixels(image)
    return _distance(pixels, _border_colour(pixels))


def _signed_pixels(image: Image.Image) -> np.ndarray:
    """The image's RGB pixels as int16 (H x W x 3), so differences do not wrap."""
    return np.asarray(image.convert("RGB")).astype(np.int16)


def _distance(pixels: np.ndarray, colour: Sequence[float]) -> np.ndarray:
    """Each pixel's largest channel difference from ``colour`` (H x W)."""
    return np.abs(pixels - np.asarray(colour)).max(axis=-1)


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    overlap = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - overlap
    return overlap / union if union > 0 else 0.0


def grow(box: tuple[int, int, int, int], size: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """``box`` grown by ``margin`` of its width and height on each side, kept inside ``size``."""
    left, top, right, bottom = box
    dx, dy = margin * (right - left), margin * (bottom - top)
    return (max(0, round(left - dx)), max(0, round(top - dy)), min(size[0], round(right + dx)),
            min(size[1], round(bottom + dy)))


def grow_items(image: Image.Image, boxes: Sequence[tuple[int, int, int, int]], margin: float = ITEM_MARGIN
               ) -> list[tuple[int, int, int, int]]:
    """Grow the boxes that cut an item edge to edge by ``margin``, never past a neighbour's near edge.

    A box whose outline stands out from the backdrop almost all the way round
    (:data:`FRAMED_SHARE`) is a photo pasted whole, with its own margin: it is kept as it is.
    Any other box is grown (:func:`grow`), but on each side only up to the near edge of a box
    beside it, so a bundle's tightly packed items do not take in part of the next one.
    """
    stands_out = _backdrop_distance(image) > min(ITEM_TOLERANCES)
    grown = []
    for box in boxes:
        left, top, right, bottom = box
        if not (0 <= left < right <= image.width and 0 <= top < bottom <= image.height):
            grown.append(box)  # empty or outside the image: nothing to grow (item_boxes makes none)
            continue
        outline = np.concatenate([stands_out[top, left:right], stands_out[bottom - 1, left:right],
                                  stands_out[top:bottom, left], stands_out[top:bottom, right - 1]])
        if outline.size and outline.mean() >= FRAMED_SHARE:
            grown.append(box)
            continue
        left, top, right, bottom = grow(box, image.size, margin)
        for other in boxes:
            beside = other[1] < box[3] and box[1] < other[3]
            above_below = other[0] < box[2] and box[0] < other[2]
            if beside and other[0] >= box[2]:
                right = min(right, other[0])
            elif beside and other[2] <= box[0]:
                left = max(left, other[2])
            elif above_below and other[1] >= box[3]:
                bottom = min(bottom, other[1])
            elif above_below and other[3] <= box[1]:
                top = max(top, other[3])
        grown.append((left, top, right, bottom))
    return grown


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


def _border_colour(pixels: np.ndarray) -> tuple[int, int, int]:
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # B x 3
    return tuple(int(value) for value in np.median(border, axis=0))  # type: ignore[return-value]


def region_count(mode: str, grids: Sequence[tuple[int, int]] = GRIDS) -> int:
    """Regions per image for ``mode`` (``"items"`` pads to a fixed count with the whole image)."""
    if mode == "items":
        return 1 + MAX_ITEMS
    if mode == "grid":
        return len(region_boxes(8, 8, grids))
    raise ValueError(f"query regions must be 'items' or 'grid'; got {mode!r}")


def image_regions(image: Image.Image, grids: Sequence[tuple[int, int]] = GRIDS, *,
                  mode: str = "grid") -> list[tuple[int, int, int, int]]:
    """The ``(left, top, right, bottom)`` boxes :func:`region_crops` embeds, the whole image first.

    With ``mode="items"``: the whole image and its :func:`item_boxes` when it shows two or more,
    else its :func:`lone_item_box` if it has one, both found on a copy at most
    :data:`PROPOSAL_SIDE` pixels long; with ``mode="grid"``: every cell of every layout of ``grids``.
    """
    if mode == "items":
        copy = _proposal_copy(image)
        items = item_boxes(copy)
        if len(items) < 2:
            lone = lone_item_box(copy)
            items = [lone] if lone is not None else []
        return [(0, 0, *image.size)] + [_map_box(box, copy.size, image.size) for box in items]
    if mode == "grid":
        return region_boxes(*image.size, grids)
    raise ValueError(f"query regions must be 'items' or 'grid'; got {mode!r}")


def crop_boxes(image: Image.Image, boxes: Sequence[tuple[int, int, int, int]], mode: str
               ) -> list[tuple[int, int, int, int]]:
    """What to crop for the regions ``boxes`` found with ``mode``: item boxes grown (:func:`grow_items`,
    on :func:`image_regions`' copy), layout cells as they are (a cell grown would show its neighbours)."""
    if mode != "items":
        return list(boxes)
    copy = _proposal_copy(image)
    grown = grow_items(copy, [_map_box(box, image.size, copy.size) for box in boxes])
    return [_map_box(box, copy.size, image.size) for box in grown]


def _proposal_copy(image: Image.Image) -> Image.Image:
    """``image`` as RGB, reduced (antialiased) to a longer side of at most :data:`PROPOSAL_SIDE`."""
    copy = image.convert("RGB")  # a new image: Pillow's thumbnail reduces in place, never enlarges
    copy.thumbnail((PROPOSAL_SIDE, PROPOSAL_SIDE), Image.BOX)
    return copy


def _map_box(box: tuple[int, int, int, int], source: tuple[int, int], target: tuple[int, int]) -> tuple[int, ...]:
    """``box`` on an image of size ``source`` as a box on one of size ``target`` (rounded: it maps back)."""
    if source == target:
        return box
    x, y = target[0] / source[0], target[1] / source[1]
    left, top, right, bottom = box
    return (round(left * x), round(top * y), min(target[0], round(right * x)), min(target[1], round(bottom * y)))


def crop_regions(image: Image.Image, boxes: Sequence[tuple[int, int, int, int]], size: int) -> torch.Tensor:
    """Each box of ``image`` as a ``size`` square: padded with the border colour, then resized.

    Shape:
        - output: :math:`(len(boxes), 3, size, size)` uint8.
    """
    from ecomaug.evaluation.embed import prepare

    image = image.convert("RGB")
    fill = _border_colour(np.asarray(image))
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
    """Every region of ``image`` (:func:`image_regions`) as a ``size`` square (:func:`crop_regions`).

    With ``mode="items"`` R varies from image to image (1 to ``1 + MAX_ITEMS``).

    Shape:
        - output: :math:`(R, 3, size, size)` uint8, the whole image first.
    """
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    image = image.convert("RGB")
    boxes = image_regions(image, grids, mode=mode)
    return crop_regions(image, boxes[:1] + crop_boxes(image, boxes[1:], mode), size)  # the whole image as it is


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
