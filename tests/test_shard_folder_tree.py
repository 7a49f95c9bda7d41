"""``ecomaug shard --item-id-from parent --val-split``: own images in a folder tree, no manifest."""

from __future__ import annotations

import json
import random

from click.testing import CliRunner
from PIL import Image

import loaders
from ecomaug.cli import main

ITEMS, PHOTOS = 10, 3


def write_tree(root):
    """ITEMS sub-folders of PHOTOS distinct JPEGs each, one file that is no image, one at the top."""
    rng = random.Random(0)
    for item in range(ITEMS):
        folder = root / "catalogue" / f"sku{item:03d}"
        folder.mkdir(parents=True)
        for photo in range(PHOTOS):
            colour = tuple(rng.randrange(256) for _ in range(3))
            image = Image.new("RGB", (96, 80), colour)
            image.putpixel((photo, item), (255 - colour[0], 0, 0))
            image.save(folder / f"{photo}.jpg", quality=95)
    (root / "catalogue" / "sku000" / "notes.txt").write_text("not a picture")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "catalogue" / "top.jpg")
    return root / "catalogue"


def item_ids(shards):
    return [batch_meta.get("item_id") for batch in loaders.build_loader(
        shards, backend="torch", device="cpu", batch_size=64, crop_size=32, mode="eval", num_workers=0)
        for batch_meta in batch.meta]


def shard(arguments):
    result = CliRunner().invoke(main, ["shard", *map(str, arguments), "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    return result.output


def test_item_id_from_parent_takes_the_folder_name(tmp_path):
    tree = write_tree(tmp_path)
    shard([tree, tmp_path / "out", "--item-id-from", "parent"])
    found = item_ids(tmp_path / "out")
    assert sorted(set(found) - {None}) == [f"sku{item:03d}" for item in range(ITEMS)]
    assert found.count(None) == 1  # catalogue/top.jpg
    assert all(found.count(f"sku{item:03d}") == PHOTOS for item in range(ITEMS))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    # the top-level photo has no item folder: written without an item_id, not given a made-up one
    assert manifest["totals"] == {**manifest["totals"], "inputs": ITEMS * PHOTOS + 2,
                                  "written": ITEMS * PHOTOS + 1, "skipped": 1}
    assert manifest["options"]["item_id_from"] == "parent"


def test_val_split_holds_out_whole_items_and_the_counts_reconcile(tmp_path):
    tree = write_tree(tmp_path)
    out = tmp_path / "out"
    output = shard([tree, out, "--item-id-from", "parent", "--val-split", "0.2", "--seed", "3"])
    assert f"validation set (--val-split 0.2, by item): {out / 'val'}" in output
    train, val = (json.loads(path.read_text()) for path in (out / "manifest.json", out / "val" / "manifest.json"))
    train_items, val_items = set(item_ids(out)) - {None}, set(item_ids(out / "val"))
    assert len(val_items) == 2 and len(train_items) == ITEMS - 2 and not train_items & val_items
    inputs = ITEMS * PHOTOS + 2
    assert train["totals"]["written"] + train["totals"]["skipped"] + val["totals"]["written"] \
        + val["totals"]["skipped"] == inputs
    assert val["totals"]["written"] == 2 * PHOTOS
    for manifest, part in ((train, "train"), (val, "val")):
        assert manifest["split"] == {**manifest["split"], "part": part, "val_split": 0.2, "seed": 3,
                                     "inputs": inputs, "items": ITEMS, "val_items": 2, "val_dir": "val"}
    assert train["split"]["train_inputs"] + train["split"]["val_inputs"] == inputs
    # the validation set is not part of the training set read from OUT_DIR
    assert loaders.load_shard_set(out).num_samples == train["totals"]["written"]
    # same seed: the same split, and a rerun finds both parts complete
    again = shard([tree, out, "--item-id-from", "parent", "--val-split", "0.2", "--seed", "3"])
    assert again.count("already complete") == 2
    other = tmp_path / "other"
    shard([tree, other, "--item-id-from", "parent", "--val-split", "0.2", "--seed", "4"])
    assert set(item_ids(other / "val")) != val_items


def test_val_split_without_item_ids_is_one_clear_error(tmp_path):
    tree = write_tree(tmp_path)
    result = CliRunner().invoke(main, ["shard", str(tree), str(tmp_path / "out"), "--val-split", "0.1",
                                       "--workers", "0", "--no-progress"])
    assert result.exit_code == 2
    assert "val_split needs at least two items with an item_id" in result.output
    assert "item_id_from='parent'" in result.output
    result = CliRunner().invoke(main, ["shard", str(tree), str(tmp_path / "out2"), "--val-split", "1.5",
                                       "--item-id-from", "parent", "--workers", "0", "--no-progress"])
    assert result.exit_code == 2 and "--val-split': 1.5 is not in the range 0<x<1" in result.output
