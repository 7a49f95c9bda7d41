"""Listing-aware positives: two photos of one item as the two views, and the item kept out of its negatives."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ecomaug import engine
from ecomaug.config import parse_config
from ecomaug.listing_views import NO_ITEM, ListingViews, item_codes
from ecomaug.moco import MoCo, info_nce

TINY_FLAGS = ["--model", "test_resnet", "--crop-size", "32", "--batch-size", "16", "--queue-size", "16",
              "--momentum", "0.9", "--opt", "adamw", "--base-lr", "0.05", "--warmup-epochs", "0",
              "--weight-decay", "0", "--no-channels-last", "--no-progress", "--backend", "torch",
              "--num-workers", "0", "--hidden-dim", "64", "--dim", "32", "--no-export", "--log-every", "1",
              "--checkpoint-every", "1000"]


def _views(values: list[int]) -> list[torch.Tensor]:
    """Two uint8 batches: the first all zeros, the second's sample i filled with values[i]."""
    second = torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()
    return [torch.zeros_like(second), second]


def _filled(view: torch.Tensor) -> list[int]:
    return view[:, 0, 0, 0].tolist()


def test_second_view_comes_from_another_photo_of_the_item():
    listing = ListingViews(1.0, capacity=8)
    listing(_views([1, 2, 3]), [{"key": "a", "item_id": "x"}, {"key": "b", "item_id": "y"}, {"key": "c"}])
    first, second = listing(_views([11, 12, 13, 14]), [
        {"key": "a2", "item_id": "x"},  # another photo of x: gets a's view
        {"key": "b", "item_id": "y"},  # the same photo of y again: its own view, never a "pair" of itself
        {"key": "c"},  # no item_id: untouched
        {"key": "d", "item_id": "z"}])  # an item not seen before
    assert _filled(second) == [1, 12, 13, 14]
    assert _filled(first) == [0, 0, 0, 0]
    assert listing.stats() == {"listing_pairs": round(1 / 7, 4), "with_item_id": round(5 / 7, 4)}


def test_probability_zero_never_swaps_and_the_table_is_bounded():
    never = ListingViews(0.0, capacity=8)
    for step in range(3):
        meta = [{"key": f"a{step}", "item_id": "x"}, {"key": f"b{step}", "item_id": "y"}]
        _, second = never(_views([step] * 2), meta)
        assert _filled(second) == [step, step]
    small = ListingViews(1.0, capacity=1)
    small(_views([1, 2]), [{"key": "a", "item_id": "x"}, {"key": "b", "item_id": "y"}])  # y evicts x
    _, second = small(_views([5, 6]), [{"key": "a2", "item_id": "x"}, {"key": "b2", "item_id": "y"}])
    assert _filled(second) == [5, 6]  # x was gone, and x's new view evicted y before y came
    assert len(small.table) == 1


def test_half_probability_swaps_about_half():
    listing = ListingViews(0.5, capacity=4, seed=3)
    swapped = 0
    for step in range(200):
        _, second = listing(_views([step % 200]), [{"key": f"p{step}", "item_id": "x"}])
        swapped += int(step > 0 and _filled(second)[0] != step % 200)
    assert 70 < swapped < 130


def test_item_codes_are_stable_and_mark_missing_ids():
    meta = [{"item_id": "x"}, {"item_id": 7}, {}, {"item_id": ""}, {"item_id": "x"}]
    codes = item_codes(meta, 6, torch.device("cpu"))
    assert codes.tolist()[2:4] == [NO_ITEM, NO_ITEM] and codes[5] == NO_ITEM  # no meta for the sixth
    assert codes[0] == codes[4] != codes[1]
    assert codes[0] == item_codes([{"item_id": "x"}], 1, torch.device("cpu"))[0]


def test_masked_negatives_are_left_out_of_the_softmax():
    generator = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(2, 8, generator=generator), dim=1) for _ in range(2))
    queue = F.normalize(torch.randn(8, 5, generator=generator), dim=0)
    same = torch.zeros(2, 5, dtype=torch.bool)
    same[0, 1] = same[1, 3] = True
    masked, _ = info_nce(q, k, queue, 0.2, same)
    loss_0, _ = info_nce(q[:1], k[:1], queue[:, [0, 2, 3, 4]], 0.2)
    loss_1, _ = info_nce(q[1:], k[1:], queue[:, [0, 1, 2, 4]], 0.2)
    assert torch.allclose(masked, (loss_0 + loss_1) / 2)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_moco_keeps_the_queries_own_item_out_of_its_negatives(version):
    torch.manual_seed(0)
    model = MoCo("test_resnet", dim=16, hidden_dim=32, K=8, m=0.9, version=version, mask_same_item=True)
    views = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    meta = [{"item_id": "x"}, {"item_id": "x"}, {"item_id": "y"}, {}]
    output = model(*views, meta=meta)
    assert torch.isfinite(output.loss)
    if version == "v2":  # the batch's item codes are queued beside its keys
        assert model.queue_items[:4].tolist() == item_codes(meta, 4, torch.device("cpu")).tolist()
        assert (model.queue_items[4:] == NO_ITEM).all()
        # a checkpoint from before queue_items loads, its keys of no known item
        state = {name: value for name, value in model.state_dict().items() if name != "queue_items"}
        model.load_state_dict(state)
        assert (model.queue_items == NO_ITEM).all()


def test_a_run_pairs_the_sample_listings_photos(sample_shards, tmp_path):
    out = tmp_path / "run"
    config = parse_config(["--data", str(sample_shards), "--out", str(out), *TINY_FLAGS, "--max-steps", "6",
                           "--listing-positives", "1", "--mask-same-item"])
    engine.train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [record for record in records if record["event"] == "train"][-1]
    assert last["with_item_id"] == 1.0  # every photo of the bundled sample has its item_id
    assert last["listing_pairs"] > 0.1  # the sample's items have 4 photos each: pairs are found
    assert json.loads((out / "config.json").read_text())["listing_positives"] == 1.0


@pytest.mark.parametrize("flags, message", [
    (["--listing-positives", "1.5"], "--listing-positives must be in [0, 1]"),
    (["--listing-table", "0"], "--listing-table must be in"),
    (["--mask-same-item", "--objective", "siamese"], "--mask-same-item"),
])
def test_bad_listing_flags_are_refused(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(["--out", str(tmp_path / "run"), *flags])
