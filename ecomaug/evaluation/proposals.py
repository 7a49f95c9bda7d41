"""Item proposals: where the items of a listing photo are, without knowing what they are.

The blobs that stand out from the photo's border colour (the backdrop a bundle's items are laid out
on), each blob's box a proposal, found at a coarse and a fine colour tolerance (a pale photo on a
pale backdrop only stands out at the fine one, touching items only come apart at the coarse one)
(:func:`item_boxes`). A photo with fewer than two such blobs shows one item: when that item fills
less than :data:`LONE_ITEM_AREA` of the frame (a listing photographed at an angle, or from afar)
its tight box is the one proposal (:func:`lone_item_box`). A box that cuts an item edge to edge is
grown by :data:`ITEM_MARGIN` before it is cropped (:func:`grow_items`).

All of it runs on a copy at most :data:`PROPOSAL_SIDE` pixels long whatever the photo's size
(:func:`find_items`), and the boxes are mapped back onto the photo. Query regions
(:mod:`ecomaug.evaluation.regions`) and ``match --query-regions`` embed what this finds.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from ecomaug.dewatermark.detections import box_iou

MAX_ITEMS = 12  # proposals kept per image, the largest first
# Colour tolerances of item_boxes. On the benchmark's 640 bundles (corpus version 6) a box overlaps the wanted
# tile by IoU >= 0.5 for 74 % at 30 alone, 91 % with 10 added; single-item queries get regions no more often
# (20-30 %).
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
# benchmark's perspective queries (640, corpus version 6, 224 + 128 px) R@1 0.566 -> 0.759 for frozen Lite0,
# 0.820 -> 0.866 for its `ecom` fine-tune, others within 0.003 (docs/finetune.md#lone-items); shares 0.3-0.9 do
# as well.
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
        if all(box_iou(box, kept) < SAME_BOX_IOU for kept in boxes):
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
    stands_out = _distance(pixels, border_colour(pixels)) > tolerance
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
    return _distance(pixels, border_colour(pixels))


def _signed_pixels(image: Image.Image) -> np.ndarray:
    """The image's RGB pixels as int16 (H x W x 3), so differences do not wrap."""
    return np.asarray(image.convert("RGB")).astype(np.int16)


def _distance(pixels: np.ndarray, colour: Sequence[float]) -> np.ndarray:
    """Each pixel's largest channel difference from ``colour`` (H x W)."""
    return np.abs(pixels - np.asarray(colour)).max(axis=-1)


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


def border_colour(pixels: np.ndarray) -> tuple[int, int, int]:
    """The median colour of an image's outermost pixels (``pixels``: H x W x 3): its backdrop."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # B x 3
    return tuple(int(value) for value in np.median(border, axis=0))  # type: ignore[return-value]


def proposal_copy(image: Image.Image) -> Image.Image:
    """``image`` as RGB, reduced (antialiased) to a longer side of at most :data:`PROPOSAL_SIDE`."""
    copy = image.convert("RGB")  # a new image: Pillow's thumbnail reduces in place, never enlarges
    copy.thumbnail((PROPOSAL_SIDE, PROPOSAL_SIDE), Image.BOX)
    return copy


def map_box(box: tuple[int, int, int, int], source: tuple[int, int], target: tuple[int, int]) -> tuple[int, ...]:
    """``box`` on an image of size ``source`` as a box on one of size ``target`` (rounded: it maps back)."""
    if source == target:
        return box
    x, y = target[0] / source[0], target[1] / source[1]
    left, top, right, bottom = box
    return (round(left * x), round(top * y), min(target[0], round(right * x)), min(target[1], round(bottom * y)))


def find_items(image: Image.Image) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int, int, int]]]:
    """The items ``image`` shows as boxes on it, and the box to crop for each.

    On one copy at most :data:`PROPOSAL_SIDE` long (:func:`proposal_copy`): its :func:`item_boxes`
    when it shows two or more, else its :func:`lone_item_box` if it has one, grown
    (:func:`grow_items`); both lists mapped back onto ``image``. Empty for a photo of one item
    that fills its frame.
    """
    copy = proposal_copy(image)
    found = item_boxes(copy)
    if len(found) < 2:
        lone = lone_item_box(copy)
        found = [lone] if lone is not None else []
    return ([map_box(box, copy.size, image.size) for box in found],
            [map_box(box, copy.size, image.size) for box in grow_items(copy, found)])
