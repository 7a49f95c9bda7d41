"""Listing-aware positives: the two views of a sample cut from two photos of the same item.

A listing's several photos, or rows sharing an ``item_id``, are positives no augmentation can fake
(a real other viewpoint, background, framing). The loaders cut both views from one photo; this
module swaps the second view, with a probability, for a view of another photo of the same item
seen in a recent batch. It keeps, per ``item_id``, the last second-view crop of that item (uint8,
on the views' device) and the key of the photo it came from, in a bounded least-recently-used
table, so it works with every loader backend and any shard order; photos of one item written close
together (as ``ecomaug shard`` writes a manifest's rows) meet within the shuffle buffer, and a table
holding all items pairs them across epochs too.

The same ``item_id`` is also how :class:`ecomaug.moco.MoCo` keeps a query's own item out of its
negatives (:func:`item_codes`).
"""

from __future__ import annotations

import collections
import hashlib
import logging
from typing import Any, Sequence

import torch

NO_ITEM = -1  # the code of a sample without item_id
_LOG = logging.getLogger(__name__)


def item_id_of(meta: dict[str, Any] | None) -> str | None:
    """A sample's ``item_id`` as a string, or None where it has none (absent, None or ``""``): the one
    rule the listing views, MoCo's masking, the Siamese labels and the kNN monitor share."""
    value = meta.get("item_id") if isinstance(meta, dict) else None
    return None if value in (None, "") else str(value)


def item_codes(meta: Sequence[dict[str, Any]] | None, count: int, device: torch.device) -> torch.Tensor:
    """Each sample's ``item_id`` as a stable 62-bit integer (sha1), :data:`NO_ITEM` where it has none.

    Stable across processes and runs (no Python ``hash``), so codes gathered from every rank and
    kept in a checkpointed queue still compare equal.

    Shape:
        - output: :math:`(count,)` int64 on ``device``.
    """
    codes = []
    for index in range(count):
        item = item_id_of(meta[index]) if meta is not None and index < len(meta) else None
        codes.append(NO_ITEM if item is None else int(hashlib.sha1(item.encode("utf-8")).hexdigest()[:15], 16))
    return torch.tensor(codes, dtype=torch.long, device=device)


def item_matches(items: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """True where ``others[j]`` is of the item of ``items[i]`` (samples without one match nothing).

    Shape:
        - items: :math:`(N,)`; others: :math:`(M,)`; output: :math:`(N, M)` bool.
    """
    return (items[:, None] == others[None, :]) & (items[:, None] != NO_ITEM)


class ListingViews:
    """Replaces a sample's second view by a view of another photo of its item, with probability ``p``.

    Args:
        p: the probability that a sample whose item has another photo in the table gets that
            photo's view as its second view.
        capacity: items whose last view the table keeps (least recently seen dropped first);
            memory is ``capacity * 3 * S * S`` bytes on the views' device.
        seed: seeds the coin flips (a CPU generator of its own). The table is not checkpointed: a
            resumed run starts it empty and refills it within an epoch.

    Shape:
        - views: two :math:`(N, 3, S, S)` uint8 tensors; returned the same (the second a copy
          when any sample was swapped).
    """

    def __init__(self, p: float, *, capacity: int, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"the listing-positive probability must be in [0, 1], got {p}")
        if capacity < 1:
            raise ValueError(f"the listing view table needs capacity >= 1, got {capacity}")
        self.p, self.capacity = p, capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.table: collections.OrderedDict[str, tuple[str, torch.Tensor]] = collections.OrderedDict()
        self.seen = self.with_item = self.swapped = 0  # samples so far

    def __call__(self, views: Sequence[torch.Tensor], meta: Sequence[dict[str, Any]] | None) -> list[torch.Tensor]:
        views = list(views)
        if len(views) != 2 or not meta:
            return views
        first, second = views
        count = second.shape[0]
        coins = torch.rand(count, generator=self.generator).tolist()
        swaps: dict[int, torch.Tensor] = {}
        for index in range(min(count, len(meta))):
            item = item_id_of(meta[index])
            if item is None:
                continue
            self.with_item += 1
            photo = str(meta[index].get("key", index))
            cached = self.table.get(item)
            if cached is not None and cached[0] != photo and coins[index] < self.p:
                swaps[index] = cached[1]
            self.table[item] = (photo, second[index].detach().clone())
            self.table.move_to_end(item)
            if len(self.table) > self.capacity:
                self.table.popitem(last=False)
        if not self.seen and not self.with_item:
            _LOG.warning("--listing-positives %s: no sample of the first batch has an item_id; the two views "
                         "come from one photo until samples with one arrive (shard with an item_id column, or "
                         "--item-id-from parent)", self.p)
        self.seen += count
        if swaps:
            second = second.clone()
            rows = torch.tensor(list(swaps), device=second.device)
            second[rows] = torch.stack([swaps[index] for index in swaps]).to(second.device, second.dtype)
            self.swapped += len(swaps)
        return [first, second]

    def stats(self) -> dict[str, float]:
        """``listing_pairs``: the share of samples so far whose two views came from two photos of
        their item; ``with_item_id``: the share that had an ``item_id`` at all."""
        seen = max(self.seen, 1)
        return {"listing_pairs": round(self.swapped / seen, 4), "with_item_id": round(self.with_item / seen, 4)}
