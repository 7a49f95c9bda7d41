"""What makes learning show: resolution-aware blur, the pixel baseline, query regions, the benchmark."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ecomaug.augmentation.mocov2 import SeededGaussianBlur
from ecomaug.augmentation.sampling import RandomSource
from ecomaug.evaluation.baselines import tiny_image_model
import ecomaug.evaluation.proposals as proposals_module
from ecomaug.evaluation.proposals import (MAX_ITEMS, PROPOSAL_SIDE, find_items, grow_items, item_boxes,
                                          lone_item_box)
from ecomaug.evaluation.regions import (GRIDS, embed_regions, image_regions, region_boxes, region_crops,
                                        retrieve_regions)
from ecomaug.evaluation.retrieval import retrieve


@pytest.mark.parametrize("side", [32, 64, 224])
def test_blur_sigma_is_meant_at_224_px_and_follows_the_crop(side):
    blur = SeededGaussianBlur((0.1, 2.0), p=1.0, source=RandomSource(seed=0))
    absolute = SeededGaussianBlur((0.1, 2.0), p=1.0, source=RandomSource(seed=0), reference_size=None)
    images = torch.rand(64, 3, side, side)
    blur(images), absolute(images)
    scaled, raw = blur._params["sigma"], absolute._params["sigma"]
    torch.testing.assert_close(scaled, raw * side / 224)
    assert float(scaled.max()) <= 2.0 * side / 224 + 1e-6


def test_blur_reference_size_is_validated():
    with pytest.raises(ValueError, match="reference_size"):
        SeededGaussianBlur(reference_size=0)


def _item(colour: tuple[int, int, int], shape: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=colour)
    draw.line((box[0], box[1], box[2], box[3]), fill=(20, 20, 20), width=3)
    return image


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_tiny_image_baseline_embeds_thumbnails():
    model = tiny_image_model(input_size=32, side=4)
    vectors = model.embed(torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8))
    assert vectors.shape == (5, 48)
    torch.testing.assert_close(vectors.mean(dim=1), torch.zeros(5), atol=1e-5, rtol=0)


def test_region_boxes_are_the_whole_image_then_every_layout_cell():
    boxes = region_boxes(120, 60)
    assert boxes[0] == (0, 0, 120, 60)
    assert len(boxes) == sum(columns * rows for columns, rows in GRIDS)
    assert (0, 0, 60, 60) in boxes and (60, 0, 120, 60) in boxes  # two side by side
    with pytest.raises(ValueError):
        region_boxes(10, 10, [(0, 1)])
    crops = region_crops(_jpeg(_item((200, 30, 30), "ellipse", 48)), 32)
    assert crops.shape == (len(boxes), 3, 32, 32) and crops.dtype == torch.uint8


def _gallery_of_twelve():
    """Twelve items (6 colours x 2 shapes), the thumbnail model and its gallery embeddings."""
    colours = [(200, 30, 30), (30, 160, 40), (40, 60, 200), (220, 180, 20), (150, 40, 160), (20, 170, 170)]
    gallery_images = [_item(colour, shape) for colour in colours for shape in ("ellipse", "box")]
    gallery_items = [f"item{index}" for index in range(len(gallery_images))]
    model = tiny_image_model(input_size=32, side=8)
    gallery = model.embed(torch.stack([region_crops(image, 32, [(1, 1)])[0] for image in gallery_images]))
    return gallery_images, gallery_items, model, gallery


def test_the_best_region_finds_an_item_on_a_multi_item_canvas():
    gallery_images, gallery_items, model, gallery = _gallery_of_twelve()
    rng = random.Random(0)
    queries, items = [], []
    for target in range(len(gallery_images)):
        canvas = Image.new("RGB", (128, 64), (245, 245, 245))
        others = [index for index in range(len(gallery_images)) if index != target]
        canvas.paste(gallery_images[target], (0, 0) if target % 2 else (64, 0))
        canvas.paste(gallery_images[rng.choice(others)].rotate(90), (64, 0) if target % 2 else (0, 0))
        queries.append((f"q{target}", {"item_id": gallery_items[target]}, _jpeg(canvas)))
        items.append(gallery_items[target])
    regions = embed_regions(model, queries, batch_size=64)
    assert regions.shape == (len(queries), len(region_boxes(8, 8)), gallery.shape[1])
    by_region = retrieve_regions(regions, items, gallery, gallery_items, depth=3)
    whole = retrieve(regions[:, 0], items, gallery, gallery_items, depth=3)
    assert (by_region.first_hit_rank == 1).mean() == 1.0
    assert (whole.first_hit_rank == 1).mean() < 1.0  # the whole canvas mixes two items
    assert np.all(np.isfinite(by_region.average_precision))


def _bundle(tiles: list[Image.Image], size: tuple[int, int] = (192, 96)) -> Image.Image:
    canvas = Image.new("RGB", size, (200, 200, 205))
    step = size[0] // len(tiles)
    for index, tile in enumerate(tiles):
        canvas.paste(tile.resize((step - 8, step - 8)), (index * step + 4, (size[1] - step + 8) // 2))
    return canvas


def test_item_proposals_box_each_item_of_a_bundle_and_leave_a_single_item_whole():
    tiles = [_item(colour, "box") for colour in ((200, 30, 30), (30, 160, 40), (40, 60, 200))]
    boxes = item_boxes(_bundle(tiles))
    assert len(boxes) == 3
    assert sorted(box[0] // 64 for box in boxes) == [0, 1, 2]  # one box per tile, in its third
    single = Image.new("RGB", (96, 96), (200, 200, 205))
    single.paste(tiles[0], (16, 16))
    assert len(item_boxes(single)) == 1
    assert region_crops(_jpeg(single), 32, mode="items").shape == (2, 3, 32, 32)  # whole image + the small item
    filling = Image.new("RGB", (96, 96), (245, 245, 245))
    ImageDraw.Draw(filling).rectangle((6, 6, 90, 90), fill=(200, 30, 30))
    assert region_crops(_jpeg(filling), 32, mode="items").shape == (1, 3, 32, 32)  # whole image only
    assert region_crops(_jpeg(_bundle(tiles)), 32, mode="items").shape == (4, 3, 32, 32)


def test_a_lone_small_item_is_boxed_inside_its_listing_photographed_at_an_angle():
    scene = Image.new("RGB", (160, 160), (150, 170, 200))  # the backdrop round the tilted listing
    draw = ImageDraw.Draw(scene)
    draw.polygon([(20, 40), (150, 10), (140, 150), (30, 120)], fill=(245, 245, 245))  # the listing's own backdrop
    draw.ellipse((70, 60, 100, 90), fill=(200, 30, 30))
    draw.rectangle((84, 90, 88, 105), fill=(40, 40, 40))  # a second part (a stem) stays in the same box
    box = lone_item_box(scene)
    assert box is not None
    assert abs(box[0] - 70) <= 2 and abs(box[1] - 60) <= 2 and abs(box[2] - 101) <= 2 and abs(box[3] - 106) <= 2, box
    assert image_regions(scene, mode="items") == [(0, 0, 160, 160), box]
    filling = Image.new("RGB", (160, 160), (245, 245, 245))
    ImageDraw.Draw(filling).rectangle((8, 8, 150, 150), fill=(30, 60, 200))
    assert lone_item_box(filling) is None  # it fills the frame: the whole image is the item
    assert lone_item_box(Image.new("RGB", (64, 64), (245, 245, 245))) is None  # nothing on the backdrop
    assert lone_item_box(scene, max_area=0.01) is None


def test_item_regions_pad_with_the_whole_image_and_find_the_item_in_a_bundle():
    gallery_images, gallery_items, model, gallery = _gallery_of_twelve()
    rng = random.Random(0)
    queries = []
    for target in range(len(gallery_images)):
        others = rng.sample([index for index in range(len(gallery_images)) if index != target], 2)
        tiles = [gallery_images[target]] + [gallery_images[index].rotate(90) for index in others]
        rng.shuffle(tiles)
        queries.append((f"q{target}", {"item_id": gallery_items[target]}, _jpeg(_bundle(tiles))))
    filling = Image.new("RGB", (64, 64), (245, 245, 245))
    ImageDraw.Draw(filling).ellipse((2, 2, 62, 62), fill=(200, 30, 30))  # one item filling its frame
    single = (("single", {"item_id": "item0"}, _jpeg(filling)),)
    regions = embed_regions(model, [*queries, *single], batch_size=64, mode="items")
    assert regions.shape == (len(queries) + 1, 1 + MAX_ITEMS, gallery.shape[1])
    torch.testing.assert_close(regions[-1], regions[-1, :1].expand(1 + MAX_ITEMS, -1))  # one region, padded
    items = gallery_items
    by_region = retrieve_regions(regions[:-1], items, gallery, gallery_items, depth=3)
    whole = retrieve(regions[:-1, 0], items, gallery, gallery_items, depth=3)
    assert (by_region.first_hit_rank == 1).mean() == 1.0
    assert (whole.first_hit_rank == 1).mean() < 0.5


def test_multi_item_companions_are_items_held_out_of_the_gallery():
    from ecomaug.evaluation.queries import build_eval_set

    colours = [(rng_value * 37 % 256, rng_value * 91 % 256, rng_value * 53 % 256) for rng_value in range(1, 13)]
    samples = [(f"{index:02d}-{view}", {"item_id": f"item{index}"}, _jpeg(_item(colour, ("box", "ellipse")[view])))
               for index, colour in enumerate(colours) for view in range(2)]
    eval_set = build_eval_set(samples, disturbances=["clean", "multi_item"], seed=0, progress=False)
    gallery_items = {meta["item_id"] for _, meta, _ in eval_set.gallery}
    assert len(gallery_items) == 10 and "held out of the gallery" in eval_set.protocol["multi_item_companions"]
    assert {meta["item_id"] for _, meta, _ in eval_set.queries["multi_item"]} <= gallery_items
    clean_only = build_eval_set(samples, disturbances=["clean"], seed=0, progress=False)
    assert clean_only.gallery == eval_set.gallery  # the gallery does not depend on the disturbances asked for
    kept = build_eval_set(samples, disturbances=["clean", "multi_item"], seed=0, companion_share=0.0, progress=False)
    assert kept.num_items == 12 and "other gallery items" in kept.protocol["multi_item_companions"]
    with pytest.raises(ValueError, match="companion_share"):
        build_eval_set(samples, companion_share=1.0, progress=False)


def test_retrieve_regions_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        retrieve_regions(torch.zeros(2, 3, 4), ["a", "b"], torch.zeros(5, 8), list("abcde"))
    with pytest.raises(ValueError):
        retrieve_regions(torch.zeros(2, 3, 4), ["a"], torch.zeros(5, 4), list("abcde"))


def _clipart(root, count: int) -> None:
    rng = random.Random(1)
    for index in range(count):
        image = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
        draw = ImageDraw.Draw(image)
        colour = tuple(rng.randint(0, 255) for _ in range(3)) + (255,)
        draw.polygon([(rng.randint(0, 95), rng.randint(0, 95)) for _ in range(5)], fill=colour)
        draw.ellipse((20, 20, 76, 76), outline=(0, 0, 0, 255), width=4)
        folder = root / f"group{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"art{index:03d}.png")


@pytest.mark.slow
def test_robustness_benchmark_runs_end_to_end(tmp_path):
    from bench.product_corpus import CorpusSettings
    from bench.robustness import run_benchmark

    clipart = tmp_path / "clipart"
    _clipart(clipart, 120)
    settings = CorpusSettings(train_images=48, eval_items=8, images_per_item=2, size=48, seed=0)
    report = run_benchmark(
        cache=tmp_path / "corpus", out=tmp_path / "out", recipes=["mocov2", "ecom"], settings=settings,
        device="cpu", preset="sample", query_regions=["none", "items"], seed=0, reuse=True, progress=False,
        overrides=["model=test_resnet", "crop_size=32", "batch_size=16", "max_steps=2", "hidden_dim=32", "dim=16",
                   "backend=torch", "num_workers=0", "knn_every=100"],
        corpus_sources={"clipart_root": clipart, "photos": []})
    labels = [row["model"] for row in report["rows"]]
    assert len(labels) == 8 and "trained, ecom [items]" in labels and "16x16 pixels [none]" in labels
    for row in report["rows"]:
        for name in ("clean", "perspective", "watermark", "colour", "multi_item", "all_disturbed"):
            assert 0.0 <= row[f"{name}@1"] <= row[f"{name}@5"] <= 1.0
    written = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert written["rows"] == report["rows"]
    for name in ("robustness.txt", "robustness.png", "training.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    # The train/eval split is by clip-art file: no evaluation item was trained on.
    import csv

    def sources(name):
        with (tmp_path / "corpus" / name).open() as stream:
            return {row["clipart"] for row in csv.DictReader(stream)}

    assert not sources("train.csv") & sources("eval.csv")


def test_the_corpus_skips_a_drawing_that_twins_one_it_kept():
    from bench.product_corpus import DistinctItems

    arrow = Image.new("RGBA", (96, 64), (0, 0, 0, 0))
    ImageDraw.Draw(arrow).polygon([(4, 24), (60, 24), (60, 6), (92, 32), (60, 58), (60, 40), (4, 40)],
                                  fill=(40, 40, 40, 255))
    lighter = Image.fromarray(np.asarray(arrow) + np.array([30, 30, 30, 0], dtype=np.uint8))  # re-saved greyer
    ring = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    ImageDraw.Draw(ring).ellipse((8, 8, 88, 88), outline=(200, 30, 30, 255), width=10)
    distinct = DistinctItems()
    assert distinct.admit(arrow) and distinct.admit(ring)
    assert not distinct.admit(arrow.transpose(Image.Transpose.FLIP_LEFT_RIGHT))  # its mirror image
    assert not distinct.admit(lighter.resize((144, 96)))  # larger and lighter: the same drawing
    assert distinct.twins == 2 and distinct.count == 2
    square = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    ImageDraw.Draw(square).rectangle((20, 20, 76, 76), fill=(30, 60, 200, 255))
    assert distinct.admit(square)  # another item


def test_eval_command_takes_query_regions_and_the_pixel_baseline(tmp_path):
    from click.testing import CliRunner

    from ecomaug.cli import main
    from ecomaug.paths import SAMPLE_MANIFEST

    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["eval", "--gallery", str(SAMPLE_MANIFEST), "--random-init", "test_resnet",
                                       "--pixel-baseline", "--query-regions", "grid", "--max-items", "6",
                                       "--disturbance", "multi_item", "--input-size", "32", "--out", str(out),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "16x16 pixels" in result.output
    report = json.loads((out / "report.json").read_text())
    assert "16x16 pixels" in json.dumps(report)


def test_product_corpus_is_rebuilt_when_its_background_photos_change(tmp_path, caplog):
    from bench.product_corpus import CorpusSettings, build_corpus

    clipart = tmp_path / "clipart"
    _clipart(clipart, 60)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(photo)
    settings = CorpusSettings(train_images=12, eval_items=4, images_per_item=2, size=48, seed=0)
    with caplog.at_level("WARNING", logger="bench.product_corpus"):
        build_corpus(tmp_path / "corpus", settings, clipart_root=clipart, photos=[], progress=False)
    assert "no background photos" in caplog.text
    stamp = tmp_path / "corpus" / "corpus.json"
    assert json.loads(stamp.read_text())["made_from"]["photos"] == []
    build_corpus(tmp_path / "corpus", settings, clipart_root=clipart, photos=[photo], progress=False)
    assert json.loads(stamp.read_text())["made_from"]["photos"] == [str(photo)]


def test_a_pale_tile_among_bold_ones_is_found_and_a_shaded_single_item_stays_whole():
    pale = Image.new("RGB", (56, 56), (222, 222, 226))  # a photo on its own pale backdrop
    ImageDraw.Draw(pale).ellipse((12, 12, 44, 44), outline=(185, 185, 190), width=2)
    bundle = Image.new("RGB", (192, 96), (205, 205, 210))
    bundle.paste(_item((200, 30, 30), "box", 56), (4, 20))
    bundle.paste(_item((30, 60, 200), "ellipse", 56), (68, 20))
    bundle.paste(pale, (132, 20))
    boxes = item_boxes(bundle)
    assert any(box[0] >= 128 for box in boxes), boxes  # the pale tile only stands out at the fine tolerance
    assert not any(box[0] >= 128 for box in item_boxes(bundle, tolerances=(30,)))
    single = Image.new("RGB", (96, 96), (205, 205, 210))
    ImageDraw.Draw(single).rectangle((20, 20, 76, 76), fill=(190, 60, 60))
    ImageDraw.Draw(single).rectangle((0, 80, 96, 96), fill=(195, 195, 200))  # a faint shadow band
    assert len(item_boxes(single)) == 1  # one item at the coarse tolerance: its shading is not split off


def test_bare_items_grow_up_to_their_neighbours_and_pasted_photos_keep_their_own_margin():
    canvas = Image.new("RGB", (200, 100), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.ellipse((10, 30, 50, 70), fill=(30, 60, 200))  # a bare item on the shared white backdrop
    draw.ellipse((60, 30, 100, 70), fill=(200, 30, 30))  # another, 10 px to its right
    canvas.paste(_item((30, 160, 40), "box", 60), (130, 20))  # a photo pasted whole, its own grey backdrop
    boxes = sorted(item_boxes(canvas))
    assert len(boxes) == 3
    first, second, photo = grow_items(canvas, boxes)
    assert first[0] < boxes[0][0] and first[1] < boxes[0][1]  # grown where there is only backdrop
    assert first[2] <= boxes[1][0]  # but not into the item beside it
    assert photo == boxes[2]  # the photo carries its margin already
    assert grow_items(canvas, boxes, margin=0.0)[:2] == boxes[:2]


def test_a_large_photo_gets_the_regions_of_its_reduced_copy_found_on_that_copy(monkeypatch):
    tiles = [_item(colour, "box") for colour in ((200, 30, 30), (30, 160, 40), (40, 60, 200))]
    small = _bundle(tiles, size=(PROPOSAL_SIDE, PROPOSAL_SIDE // 2))
    large = small.resize((4 * small.width, 4 * small.height), Image.NEAREST)  # 1536 x 768: every pixel 4 x 4
    seen = []
    find = proposals_module.item_boxes
    monkeypatch.setattr(proposals_module, "item_boxes",
                        lambda image, **kw: seen.append(image.size) or find(image, **kw))
    found, grown = find_items(large)
    assert seen == [small.size]  # the proposals ran on the copy, not on the 1.2 MP photo
    expected, expected_grown = find_items(small)
    assert len(found) == len(expected) == 3
    assert found == [tuple(4 * v for v in box) for box in expected]
    assert grown == [tuple(4 * v for v in box) for box in expected_grown]  # grown (pasted photos: kept) on the copy
    assert all(0 <= l < r <= large.width and 0 <= t < b <= large.height for l, t, r, b in grown)
    assert image_regions(large, mode="items") == [(0, 0, *large.size)] + found


def test_region_scores_are_normalised_so_a_companion_close_to_everything_does_not_win():
    generator = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(40, 16, generator=generator), dim=1)
    hub = torch.nn.functional.normalize(gallery.mean(dim=0), dim=0)  # a companion near every gallery item
    gallery[1:] = torch.nn.functional.normalize(gallery[1:] + 1.5 * hub, dim=1)
    target = torch.nn.functional.normalize(gallery[0] + 0.5 * torch.randn(16, generator=generator), dim=0)
    regions = torch.stack([hub, hub, target])[None]  # whole image (mostly the companion), companion, the item
    items = [f"item{index}" for index in range(40)]
    raw = retrieve_regions(regions, ["item0"], gallery, items, depth=3, normalised=False)
    normalised = retrieve_regions(regions, ["item0"], gallery, items, depth=3)
    assert raw.first_hit_rank[0] != 1 and normalised.first_hit_rank[0] == 1
    single = gallery[5][None, None].expand(1, 3, -1)  # one region, padded: the ranking is the whole image's
    assert retrieve_regions(single, ["item5"], gallery, items, depth=3).topk_indices[0, 0] == 5
