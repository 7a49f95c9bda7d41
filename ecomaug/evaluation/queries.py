"""The evaluation protocol: a clean gallery of one image per item, disturbed queries of the others.

Item matching asks "which listing sells this item?", not "which file is this?", so a query is
never a copy of a gallery image: for every item, one image (the smallest key, so the choice is
stable) goes into the gallery clean, and each *other* image of the item becomes a query, once per
disturbance. A query is correct when it retrieves its item's gallery image. Items with a single
image stay in the gallery as distractors. Disturbing copies of the gallery images themselves would
reward near-duplicate detection, which even a random network does well.
"""

from __future__ import annotations

import io
import random
from collections import defaultdict
from dataclasses import dataclass, field
from collections.abc import Sequence as SequenceABC
from typing import Any, Sequence

from PIL import Image

from ecomaug.evaluation.disturbances import DISTURBANCES, apply_disturbance, font_pool, make_rng

Sample = tuple[str, dict[str, Any], bytes]  # key, metadata, encoded image


@dataclass
class EvalSet:
    """A gallery and one query set per disturbance, all as encoded images held in memory.

    Attributes:
        gallery: one clean image per item.
        queries: ``{disturbance: samples}``; every set holds the same query keys in the same order.
        seed: the seed the disturbances were drawn with.
        num_items: items in the gallery.
    """

    gallery: list[Sample]
    queries: dict[str, list[Sample]]
    seed: int
    num_items: int
    protocol: dict[str, Any] = field(default_factory=dict)


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)  # near-lossless: the disturbance is the change
    return buffer.getvalue()


class _OtherItems(SequenceABC):
    """The companion pool without one item's block: lazy image loaders, no copying per query."""

    def __init__(self, pool: list[tuple[str, bytes]], start: int, stop: int) -> None:
        self.pool, self.start, self.width = pool, start, stop - start

    def __len__(self) -> int:
        return len(self.pool) - self.width

    def __getitem__(self, index):  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        data = self.pool[index if index < self.start else index + self.width][1]
        return lambda: _decode(data)


def _hold_out_companions(samples: Sequence[Sample], *, share: float, seed: int
                         ) -> tuple[list[Sample], list[Sample]]:
    """Split off a seeded ``share`` of the items (at least 2, only with 10 items or more)."""
    items = sorted({str(sample[1]["item_id"]) for sample in samples if sample[1].get("item_id") not in (None, "")})
    if share <= 0 or len(items) < 10:
        return list(samples), []
    held = set(random.Random(f"{seed}-companions").sample(items, max(2, round(share * len(items)))))
    kept = [sample for sample in samples if str(sample[1].get("item_id")) not in held]
    return kept, [sample for sample in samples if str(sample[1].get("item_id")) in held]


def split_gallery(samples: Sequence[Sample], *, max_items: int | None = None,
                  max_queries_per_item: int | None = None, seed: int = 0
                  ) -> tuple[list[Sample], list[Sample]]:
    """Pick one gallery image per item; the item's other images are the queries.

    Args:
        samples: ``(key, meta, bytes)`` with ``meta["item_id"]``.
        max_items: keep this many items (a seeded random subset), all when None.
        max_queries_per_item: at most this many queries per item (the smallest keys).
        seed: seed of the item subset.

    Returns:
        ``(gallery, queries)``, both ordered by item then key.

    Raises:
        ValueError: samples without ``item_id``, or no item with two images or more.
    """
    by_item: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        item = sample[1].get("item_id")
        if item is None or item == "":
            raise ValueError(f"sample {sample[0]!r} has no item_id; evaluation needs shards made "
                             "from a manifest with an item_id column")
        by_item[str(item)].append(sample)
    items = sorted(by_item)
    if max_items is not None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1; got {max_items}")
        items = sorted(random.Random(seed).sample(items, min(max_items, len(items))))
    gallery, queries = [], []
    for item in items:
        ordered = sorted(by_item[item], key=lambda sample: sample[0])
        gallery.append(ordered[0])
        queries.extend(ordered[1:][:max_queries_per_item])
    if not queries:
        raise ValueError("no item has two images or more, so there is nothing to query: the "
                         "gallery holds one image per item and queries are the item's other images")
    return gallery, queries


def build_eval_set(samples: Sequence[Sample], *, disturbances: Sequence[str] = DISTURBANCES,
                   seed: int = 0, max_items: int | None = None,
                   max_queries_per_item: int | None = None, companion_share: float = 0.2,
                   progress: bool = True) -> EvalSet:
    """Split into gallery and queries, then make every query set (deterministic under ``seed``).

    A multi-item query shows its item among companions. Were the companions other gallery items,
    the canvas would show several gallery items with one of them called "the" target, and a
    perfect matcher would score R@1 = 1/items-on-the-canvas (0.29 on average for 2-6 items). So
    when there are 10 items or more, ``companion_share`` of the items (seeded, at least 2) are
    held out of the gallery and the queries, whichever disturbances are asked for (the gallery
    stays the same), and only lend their images as companions: the target is the one gallery
    item on its canvas.

    Args:
        samples: ``(key, meta, bytes)`` with ``meta["item_id"]``, e.g. from
            :func:`ecomaug.evaluation.embed.iter_data`.
        disturbances: names from :data:`~ecomaug.evaluation.disturbances.DISTURBANCES`.
        seed: seed of the disturbances and of the item subset.
        max_items: evaluate on this many items (seeded subset); all when None.
        max_queries_per_item: cap on queries per item.
        companion_share: share of the items held out as multi-item companions (0 keeps every
            item in the gallery and draws companions from other items' query images).
        progress: show a tqdm bar while disturbing.
    """
    if not 0.0 <= companion_share < 1.0:
        raise ValueError(f"companion_share must be in [0, 1); got {companion_share}")
    unknown = [name for name in disturbances if name not in DISTURBANCES]
    if unknown or not disturbances:
        raise ValueError(f"unknown disturbance(s) {unknown or '(none given)'}; choose from "
                         f"{', '.join(DISTURBANCES)}")
    # Held out whichever disturbances are asked for, so the gallery (and every recall) does not
    # depend on whether multi_item is among them.
    samples, companions = _hold_out_companions(samples, share=companion_share, seed=seed)
    gallery, plain_queries = split_gallery(samples, max_items=max_items,
                                           max_queries_per_item=max_queries_per_item, seed=seed)
    if companions:
        pool = [(str(meta["item_id"]), data) for _, meta, data in companions]
        companion_rule = (f"images of {len({item for item, _ in pool})} items held out of the gallery "
                          "and the queries: the target is the only gallery item on its canvas")
    else:  # too few items to spare: other items' non-gallery images (never a gallery copy)
        pool = [(str(meta["item_id"]), data) for _, meta, data in plain_queries]
        if len({item for item, _ in pool}) < 2:
            pool = [(str(meta["item_id"]), data) for _, meta, data in gallery]
        companion_rule = "other gallery items' images (no items to spare): R@1 is capped near 1/items on the canvas"
    blocks: dict[str, tuple[int, int]] = {}
    for position, (item, _) in enumerate(pool):
        start, _stop = blocks.get(item, (position, position))
        blocks[item] = (start, position + 1)
    fonts = font_pool()
    from tqdm.auto import tqdm

    queries: dict[str, list[Sample]] = {}
    bar = tqdm(total=len(plain_queries) * len(disturbances), desc="disturb", unit="img",
               disable=not progress)
    for name in disturbances:
        made = []
        for key, meta, data in plain_queries:
            item = str(meta["item_id"])
            others = _OtherItems(pool, *blocks.get(item, (0, 0)))
            image = apply_disturbance(name, _decode(data), make_rng(seed, name, key),
                                      others=others, fonts=fonts)
            made.append((key, {**meta, "disturbance": name}, _encode(image)))
            bar.update(1)
        queries[name] = made
    bar.close()
    protocol = {
        "gallery": "one clean image per item (its smallest key)",
        "queries": "each other image of the item, disturbed; correct = its item's gallery image",
        "items": len(gallery), "queries_per_disturbance": len(plain_queries),
        "disturbances": list(disturbances), "seed": seed,
        "independent_of_training": True,
        "multi_item_companions": companion_rule,
    }
    return EvalSet(gallery=gallery, queries=queries, seed=seed, num_items=len(gallery),
                   protocol=protocol)
