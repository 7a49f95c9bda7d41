"""Watermark removal: marks are found where they were pasted and painted out; clean images pass untouched."""

from __future__ import annotations

import json
import pickle
import random
import tarfile

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from bench.dewatermark_pr import busy_image, paste_mark, synthetic_marks
from ecomaug.dewatermark import Dewatermarker, MarkPool, box_iou, masked_ncc, scale_grid

MARKS = synthetic_marks()


@pytest.fixture(scope="module")
def pool() -> MarkPool:
    return MarkPool.from_images(MARKS)


@pytest.fixture(scope="module")
def remover(pool) -> Dewatermarker:
    return Dewatermarker(pool)


def product_photo(seed: int, size: tuple[int, int] = (256, 256)) -> Image.Image:
    """A listing-like photo: light studio gradient, a colourful object in the middle, a little noise."""
    rng = random.Random(seed)
    width, height = size
    ramp = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    top, bottom = np.array([245, 242, 238], np.float32), np.array([205, 210, 220], np.float32)
    pixels = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (height, width, 3)).copy()
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.randint(70, 120), rng.randint(70, 120)
        draw.ellipse((x0, y0, x0 + rng.randint(40, 70), y0 + rng.randint(40, 70)),
                     fill=tuple(rng.randint(0, 200) for _ in range(3)), outline=(20, 20, 20), width=2)
    noise = np.random.default_rng(seed).normal(0, 2.0, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))


# (mark, top-left, scale, opacity): corners and edges, where shops put them, at several scales.
PLACEMENTS = [
    ("text_shop88", (140, 220), 1.0, 0.9),
    ("text_shop88", (10, 12), 1.5, 0.6),
    ("logo_ring", (190, 10), 0.8, 1.0),
    ("logo_ring", (12, 170), 1.4, 0.7),
    ("text_mystore", (8, 230), 0.9, 1.0),
    ("text_mystore", (90, 8), 1.25, 0.8),
    ("badge_dealz", (160, 200), 0.9, 0.9),
    ("badge_dealz", (6, 6), 1.6, 0.75),
]


@pytest.mark.parametrize("name,xy,scale,opacity", PLACEMENTS)
def test_pasted_mark_is_found_and_removed(remover, name, xy, scale, opacity):
    clean = product_photo(seed=len(name) + xy[0])
    marked, true_box = paste_mark(clean, MARKS[name], xy, scale, opacity)

    cleaned, meta, changed = remover(marked)

    assert changed
    found = meta["dewatermark"]["found"]
    assert len(found) == 1, found
    assert found[0]["mark"] == name
    assert box_iou(found[0]["box"], true_box) > 0.5
    assert found[0]["score"] >= remover.threshold
    assert abs(found[0]["scale"] / scale - 1) < 0.15
    x0, y0, x1, y1 = true_box
    region = lambda image: np.asarray(image, np.float32)[y0:y1, x0:x1]  # noqa: E731
    before = np.abs(region(marked) - region(clean)).mean()
    after = np.abs(region(cleaned) - region(clean)).mean()
    assert after < 0.25 * before, (before, after)
    # Only the mark's neighbourhood is repainted.
    outside = np.ones(clean.size[::-1], bool)
    outside[max(0, y0 - 8): y1 + 8, max(0, x0 - 8): x1 + 8] = False
    assert np.array_equal(np.asarray(cleaned)[outside], np.asarray(marked)[outside])


def test_two_marks_in_one_image_are_both_reported(remover):
    clean = product_photo(seed=3)
    marked, box_a = paste_mark(clean, MARKS["text_shop88"], (130, 225), 1.0, 0.9)
    marked, box_b = paste_mark(marked, MARKS["logo_ring"], (10, 10), 1.0, 0.9)
    cleaned, meta, changed = remover(marked)
    assert changed and cleaned.mode == "RGB" and cleaned.size == marked.size
    found = {hit["mark"]: hit for hit in meta["dewatermark"]["found"]}
    assert set(found) == {"text_shop88", "logo_ring"}
    assert box_iou(found["text_shop88"]["box"], box_a) > 0.5
    assert box_iou(found["logo_ring"]["box"], box_b) > 0.5
    decoded = json.loads(json.dumps(meta))  # goes into the sample's json as is
    assert all(isinstance(v, int) for hit in decoded["dewatermark"]["found"] for v in hit["box"])


def clean_images() -> list[Image.Image]:
    """Busy synthetic images (text, shapes, noise) and listing-like ones, plus bundled photos if present."""
    from ecomaug.paths import SAMPLE_DIR

    rng = random.Random(7)
    images = [busy_image(rng) for _ in range(10)] + [product_photo(seed) for seed in range(3)]
    images.append(busy_image(rng, (400, 300)))
    files = sorted((SAMPLE_DIR / "images").glob("*.jpg"))[::37]
    return images + [Image.open(path).convert("RGB") for path in files]


@pytest.mark.parametrize("feature", ["gradient", "gray"])
def test_clean_images_come_back_untouched(pool, feature):
    # The default (gradient, default threshold) on every image; gray at its own measured threshold.
    remover = Dewatermarker(pool) if feature == "gradient" else Dewatermarker(pool, feature="gray", threshold=0.8)
    assert remover.feature == feature
    images = clean_images()
    for image in images if feature == "gradient" else images[::4]:
        before = np.asarray(image).copy()
        out, meta, changed = remover(image)
        assert out is image and meta == {} and changed is False
        assert np.array_equal(np.asarray(out), before)


def test_pickled_remover_gives_the_same_result(remover):
    marked, _ = paste_mark(product_photo(seed=1), MARKS["badge_dealz"], (20, 20), 1.0, 0.8)
    copy = pickle.loads(pickle.dumps(remover))
    first, second = remover(marked), copy(marked)
    assert first[1] == second[1] and first[2] == second[2]
    assert np.array_equal(np.asarray(first[0]), np.asarray(second[0]))


def test_masked_ncc_matches_opencv_reference():
    rng = np.random.default_rng(0)
    image = rng.random((60, 80), dtype=np.float32) * 255
    template = image[10:30, 20:50].copy() * 0.5 + 40  # an affine change of intensity still scores 1
    mask = (rng.random(template.shape) > 0.4).astype(np.float32)
    ours = masked_ncc([image], [template], mask, min_std=0.0)
    reference = cv2.matchTemplate(image, template, cv2.TM_CCOEFF_NORMED, mask=mask.astype(np.uint8))
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    assert np.unravel_index(ours.argmax(), ours.shape) == (10, 20)
    assert ours.max() == pytest.approx(1.0, abs=1e-4)
    flat = masked_ncc([np.full((40, 40), 200, np.float32)], [template[:10, :10]], mask[:10, :10], 2.0)
    assert np.all(flat == 0)  # a flat region never matches (and gives no NaN)


def test_pool_from_directory(tmp_path):
    MARKS["logo_ring"].save(tmp_path / "ring.png")
    (tmp_path / "notes.txt").write_text("not a mark")
    opaque = Image.new("RGB", (48, 24), (250, 250, 250))
    ImageDraw.Draw(opaque).text((4, 4), "OK", fill=(0, 0, 0))
    opaque.save(tmp_path / "plain.jpg")
    pool = MarkPool.from_directory(tmp_path)
    assert pool.names == ["plain", "ring"] and len(pool) == 2
    plain = pool.marks[0]  # no alpha: its plain background keyed out, as the training overlay reads it
    assert float(plain.alpha.min()) == 0.0 and plain.size[0] < 48 and plain.size[1] < 24
    ring = pool.marks[1]
    left, top, right, bottom = MARKS["logo_ring"].getchannel("A").getbbox()
    assert ring.size == (right - left, bottom - top)  # transparent border trimmed


def test_bad_inputs_raise_clear_errors(tmp_path, pool):
    with pytest.raises(ValueError, match="no watermark images"):
        MarkPool.from_directory(tmp_path)
    with pytest.raises(FileNotFoundError):
        MarkPool.from_directory(tmp_path / "missing")
    with pytest.raises(ValueError, match="fully transparent"):
        MarkPool.from_images({"empty": Image.new("RGBA", (20, 20), (0, 0, 0, 0))})
    with pytest.raises(ValueError, match="flat colour"):
        MarkPool.from_images({"box": Image.new("RGBA", (20, 20), (9, 9, 9, 255))})
    with pytest.raises(ValueError, match="fully transparent"):  # no alpha: the flat background is keyed out
        MarkPool.from_images({"box": Image.new("RGB", (20, 20), (9, 9, 9))})
    hard = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    ImageDraw.Draw(hard).rectangle((5, 5, 10, 25), fill=(255, 255, 255, 255))
    ImageDraw.Draw(hard).rectangle((5, 20, 20, 25), fill=(255, 255, 255, 255))  # an "L", no anti-aliasing
    assert len(MarkPool.from_images({"hard": hard, "ring": MARKS["logo_ring"]})) == 2  # binary alpha is a shape
    with pytest.raises(ValueError, match="threshold"):
        Dewatermarker(pool, threshold=1.5)
    with pytest.raises(ValueError, match="feature"):
        Dewatermarker(pool, feature="edges")
    with pytest.raises(ValueError, match="scales"):
        Dewatermarker(pool, scales=[0.0, 1.0])
    with pytest.raises(ValueError, match="min_scale"):
        scale_grid(2.0, 1.0)
    with pytest.raises(TypeError):
        Dewatermarker(MARKS)


def test_scale_grid_spans_the_range():
    grid = scale_grid(0.5, 2.0)
    assert grid[0] == 0.5 and grid[-1] == pytest.approx(2.0) and len(grid) == 13


def test_command_writes_shards_and_counts_changed(tmp_path):
    from ecomaug.cli import main

    marks_dir, images_dir, out_dir = tmp_path / "marks", tmp_path / "images", tmp_path / "out"
    marks_dir.mkdir()
    images_dir.mkdir()
    for name, mark in MARKS.items():
        mark.save(marks_dir / f"{name}.png")
    for index in range(4):
        image = product_photo(seed=10 + index)
        if index % 2 == 0:
            image, _ = paste_mark(image, MARKS["text_shop88"], (120, 200 + index), 1.0, 0.85)
        image.save(images_dir / f"img{index}.png")

    args = ["dewatermark", str(images_dir), str(out_dir), "--marks", str(marks_dir), "--workers", "0",
            "--no-progress", "--max-size", "256", "--shard-size", "10"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "changed 2 of 4" in result.output
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["totals"]["changed"] == 2
    metas = {}
    for shard in manifest["shards"]:
        with tarfile.open(out_dir / shard["tar"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    metas[meta["source"]] = meta
    found = {source: meta.get("dewatermark") for source, meta in metas.items()}
    assert sorted(s for s, f in found.items() if f) == ["img0.png", "img2.png"], found
    assert found["img0.png"]["found"][0]["mark"] == "text_shop88"

    bad = CliRunner().invoke(main, ["dewatermark", str(images_dir), str(tmp_path / "o2"),
                                    "--marks", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "Error:" in bad.output
