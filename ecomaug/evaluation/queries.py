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
                   max_queries_per_item: int | None = None, progress: bool = True) -> EvalSet:
    """Split into gallery and queries, then make every query set (deterministic under ``seed``).

    Args:
        samples: ``(key, meta, bytes)`` with ``meta["item_id"]``, e.g. from
            :func:`ecomaug.evaluation.embed.iter_data`.
        disturbances: names from :data:`~ecomaug.evaluation.disturbances.DISTURBANCES`.
        seed: seed of the disturbances and of the item subset.
        max_items: evaluate on this many items (seeded subset); all when None.
        max_queries_per_item: cap on queries per item.
        progress: show a tqdm bar while disturbing.
    """
    unknown = [name for name in disturbances if name not in DISTURBANCES]
    if unknown or not disturbances:
        raise ValueError(f"unknown disturbance(s) {unknown or '(none given)'}; choose from "
                         f"{', '.join(DISTURBANCES)}")
    gallery, plain_queries = split_gallery(samples, max_items=max_items,
                                           max_queries_per_item=max_queries_per_item, seed=seed)
    # Companions on multi-item canvases: other items' non-gallery images, so a canvas never
    # holds an exact copy of some gallery entry (gallery images when no other item has more).
    pool = [(str(meta["item_id"]), data) for _, meta, data in plain_queries]
    if len({item for item, _ in pool}) < 2:
        pool = [(str(meta["item_id"]), data) for _, meta, data in gallery]
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
    }
    return EvalSet(gallery=gallery, queries=queries, seed=seed, num_items=len(gallery),
                   protocol=protocol)
