"""This job's inputs in their final order: repeats and unsampled inputs skipped up front, the
per-group sampling, the seeded shuffle, the split into jobs by key, and the validation split by item."""

from __future__ import annotations

import collections
import hashlib
import random
from dataclasses import dataclass, replace
from typing import Any, Sequence

from loaders.convert.inputs import NOT_REGULAR, InputItem, InputListing


@dataclass
class Task:
    """One input in this job's order: either work for a process or a skip decided up front."""

    item: InputItem
    key: str
    skip: dict[str, Any] | None = None



def plan_tasks(listing: InputListing, *, balance_by: str | None, per_group: int | None, seed: int,
          shuffle: bool, num_jobs: int, job_index: int) -> list[Task]:
    """This job's inputs in their final order, with up-front skips (repeats, not sampled)."""
    tasks: list[Task] = []
    first_of: dict[str, str] = {}
    for item in listing.items:
        key = item.key
        task = Task(item=item, key=key)
        if item.problem is not None:  # a FIFO, device, dangling link or link loop in a folder
            task.skip = {"reason": NOT_REGULAR, "detail": item.problem}
        elif key in first_of:
            task.skip = {"reason": "repeated input", "duplicate_of": key,
                         "detail": "the same path is listed more than once"}
        else:
            first_of[key] = item.identity
        tasks.append(task)

    if balance_by is not None:
        groups: dict[str, list[Task]] = collections.defaultdict(list)
        for task in tasks:
            if task.skip is not None:
                continue
            value = task.item.meta.get(balance_by)
            if value is None or str(value) == "":
                task.skip = {"reason": "no group value", "detail": f"empty '{balance_by}'"}
            else:
                groups[str(value)].append(task)
        quota = per_group if per_group is not None else min((len(g) for g in groups.values()), default=0)
        for value in sorted(groups):
            members = groups[value]
            if len(members) <= quota:
                continue
            # One generator per group, seeded by (seed, group): adding a group changes no other.
            chosen = set(random.Random(f"{seed}:{balance_by}:{value}").sample(range(len(members)), quota))
            for position, task in enumerate(members):
                if position not in chosen:
                    task.skip = {"reason": "not sampled",
                                 "detail": f"{balance_by}={value}: {quota} of {len(members)} kept"}

    if shuffle:
        random.Random(seed).shuffle(tasks)
    # A key decides the job, so N jobs split the same selection into disjoint parts.
    return [task for task in tasks if int(task.key[:8], 16) % num_jobs == job_index]


def inputs_digest(tasks: Sequence[Task]) -> str:
    digest = hashlib.sha1()
    for task in tasks:
        digest.update(task.key.encode())
        digest.update(b"-" if task.skip is None else task.skip["reason"].encode())
    return digest.hexdigest()




def validation_items(listing: InputListing, fraction: float, *, seed: int) -> set[str]:
    """The item ids held out for validation: ``fraction`` of the distinct items, drawn with ``seed``.

    Whole items are held out (all their photos), so a validation query never has a photo of
    itself in training. At least one item is held out and at least one kept.

    Raises:
        ValueError: ``fraction`` outside (0, 1), or fewer than two items with an ``item_id``.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"val_split must be a fraction in (0, 1), got {fraction!r}")
    items = sorted({str(item.meta["item_id"]) for item in listing.items
                    if item.meta.get("item_id") not in (None, "")})
    if len(items) < 2:
        raise ValueError(f"val_split needs at least two items with an item_id, found {len(items)}: give a "
                         f"manifest with an item_id column, or a folder of one sub-folder per item with "
                         f"item_id_from='parent'")
    count = min(len(items) - 1, max(1, round(fraction * len(items))))
    return set(random.Random(f"{seed}:val-split").sample(items, count))


def split_listing(listing: InputListing, held_out: set[str]) -> tuple[InputListing, InputListing]:
    """``listing`` as (training inputs, validation inputs): an input goes to validation when its
    ``item_id`` is held out; inputs without one stay in training."""
    val = [item for item in listing.items if str(item.meta.get("item_id", "")) in held_out]
    train = [item for item in listing.items if str(item.meta.get("item_id", "")) not in held_out]
    return replace(listing, items=train), replace(listing, items=val)
