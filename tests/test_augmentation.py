"""Tests of the e-commerce augmentations and the recipes: shapes, devices, firing rates, replay, seeds."""

from __future__ import annotations

import math

import pytest
import torch

import ecomaug
from ecomaug.augmentation import (ColourShift, MultiItemMosaic, PerspectiveShift, RandomSource, SeededColorJitter,
                                  SeededGaussianBlur, SeededGrayscale, SeededHorizontalFlip, WatermarkOverlay)
from ecomaug.augmentation.mosaic import LAYOUTS, MAX_ITEMS
from ecomaug.watermark_pool import load_watermark_pool, pack_atlas

SIZE = 48


def _images(batch: int = 8, device: torch.device | str = "cpu", seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Smooth random images with a plain light border, like product photos.
    coarse = torch.rand(batch, 3, 6, 6, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    images[..., :4, :] = images[..., -4:, :] = images[..., :, :4] = images[..., :, -4:] = 0.95
    return images.to(device)


def _make(name: str, p: float = 1.0, seed: int = 0):
    source = RandomSource(seed=seed)
    return {
        "perspective": lambda: PerspectiveShift(p=p, turn_p=0.5, source=source),
        "colour": lambda: ColourShift(p=p, source=source),
        "watermark": lambda: WatermarkOverlay(p=p, source=source),
        "mosaic": lambda: MultiItemMosaic(p=p, source=source),
        "jitter": lambda: SeededColorJitter(p=p, source=source),
        "blur": lambda: SeededGaussianBlur(p=p, source=source),
        "grayscale": lambda: SeededGrayscale(p=p, source=source),
        "flip": lambda: SeededHorizontalFlip(p=p, source=source),
    }[name]()


AUGMENTATIONS = ["perspective", "colour", "watermark", "mosaic", "jitter", "blur", "grayscale", "flip"]


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_augmentation_shape_dtype_device_and_replay(name, device):
    augmentation = _make(name)
    images = _images(8, device)
    out = augmentation(images)
    assert out.shape == images.shape and out.dtype == torch.float32 and out.device.type == device.type
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, images), f"{name} with p=1 changed nothing"
    # Replaying the recorded parameters gives the same output.
    assert torch.equal(augmentation(images, params=augmentation._params), out)


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_augmentation_is_deterministic_under_a_seed(name):
    images = _images(8)
    first, second, other = _make(name, 0.5, seed=7), _make(name, 0.5, seed=7), _make(name, 0.5, seed=8)
    out = first(images)
    assert torch.equal(out, second(images))
    assert not torch.equal(out, other(images)), "another seed should give another draw"


@pytest.mark.parametrize("name", ["perspective", "colour", "watermark", "mosaic", "blur", "flip"])
def test_firing_rate_matches_p(name):
    p, draws = 0.3, 20000
    augmentation = _make(name, p)
    # The gate is sampled exactly as in forward, without paying for the transform.
    fired = augmentation.forward_parameters((draws, 3, SIZE, SIZE))["batch_prob"] > 0.5
    sigma = math.sqrt(p * (1 - p) / draws)
    assert abs(fired.float().mean().item() - p) < 3 * sigma


def test_skipped_samples_are_untouched():
    images = _images(16)
    augmentation = WatermarkOverlay(p=0.5, source=RandomSource(seed=1))
    out = augmentation(images)
    skipped = augmentation._params["batch_prob"] < 0.5
    assert skipped.any() and (~skipped).any()
    assert torch.equal(out[skipped], images[skipped])


def test_perspective_border_is_white_or_edge_colour_never_black():
    images = torch.full((8, 3, SIZE, SIZE), 0.6)
    images[..., 12:36, 12:36] = 0.1  # a dark item in the middle of a grey background
    augmentation = PerspectiveShift(distortion=0.9, degrees=(30, 40), p=1.0, source=RandomSource(seed=0))
    out = augmentation(images)
    corners = out[..., 0, 0]  # a strong warp uncovers every corner
    white = augmentation._params["fill_white"]
    assert torch.allclose(corners[white], torch.ones_like(corners[white]), atol=1e-4)
    assert torch.allclose(corners[~white], torch.full_like(corners[~white], 0.6), atol=1e-4)


def test_recolour_turns_hue_but_keeps_luma():
    images = torch.tensor([0.65, 0.45, 0.4])[None, :, None, None].repeat(4, 1, 8, 8)  # a muted red item
    augmentation = ColourShift(brightness=(1, 1), contrast=(1, 1), saturation=(1, 1), recolour_p=1.0,
                               recolour_turn=(0.3, 0.3), p=1.0, source=RandomSource(seed=0))
    out = augmentation(images)
    luma = torch.tensor([0.299, 0.587, 0.114])
    assert torch.allclose(torch.einsum("bchw,c->bhw", out, luma), torch.einsum("bchw,c->bhw", images, luma),
                          atol=1e-4)  # a hue turn moves chroma only
    assert (out[:, 0] < out[:, 1:].amax(1)).all(), "the red item should have turned into another colour"


def _square_pool():
    from PIL import Image

    return pack_atlas([("red-square", Image.new("RGBA", (40, 40), (255, 0, 0, 255)))])


def test_watermark_changes_the_mark_region_and_nothing_else(device):
    augmentation = WatermarkOverlay(_square_pool(), placements=["corner", "centre", "over_item"], degrees=(0, 0),
                                    opacity=(1, 1), recolour_p=0.0, p=1.0, source=RandomSource(seed=3))
    images = torch.full((16, 3, SIZE, SIZE), 0.5, device=device)
    out = augmentation(images)
    params = augmentation._params
    ys = (torch.arange(SIZE, device=device) + 0.5) / SIZE
    for row in range(len(images)):
        (cx, cy), (w, h) = params["centre"][row].tolist(), params["size"][row].tolist()
        changed = (out[row] != images[row]).any(0)
        # Outside the box (one pixel of bilinear slack): untouched. Deep inside: pure red.
        outside = ((ys[None, :] - cx).abs() > w / 2 + 1 / SIZE) | ((ys[:, None] - cy).abs() > h / 2 + 1 / SIZE)
        inside = ((ys[None, :] - cx).abs() < w / 2 - 2 / SIZE) & ((ys[:, None] - cy).abs() < h / 2 - 2 / SIZE)
        assert not changed[outside].any(), f"sample {row}: pixels outside the mark changed"
        assert inside.any() and changed[inside].all(), f"sample {row}: the mark region did not change"
        assert torch.allclose(out[row][:, inside], torch.tensor([1.0, 0.0, 0.0], device=device)[:, None], atol=1e-4)


def test_watermark_tiled_marks_cover_the_image():
    augmentation = WatermarkOverlay(_square_pool(), placements=["tiled"], p=1.0, source=RandomSource(seed=0))
    images = torch.full((4, 3, SIZE, SIZE), 0.5)
    changed = (augmentation(images) != images).any(1).float().mean((1, 2))
    assert (changed > 0.1).all() and (changed < 0.9).all()


def test_watermark_pool_from_a_user_folder(tmp_path):
    from PIL import Image

    Image.new("RGB", (60, 30), (255, 255, 255)).save(tmp_path / "plain.jpg")  # background keyed out
    logo = Image.new("RGB", (60, 30), (255, 255, 255))
    logo.paste((0, 0, 200), (20, 10, 40, 20))
    logo.save(tmp_path / "logo.jpg")
    pool = load_watermark_pool(tmp_path, texts=["my shop"])
    assert len(pool) == 3 and pool.atlas.shape[0] == 4
    assert pool.names[-1] == "text:my shop"
    with pytest.raises(ValueError, match="no watermark images"):
        load_watermark_pool(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None)


@pytest.mark.parametrize("items", range(1, MAX_ITEMS + 1))
def test_mosaic_always_contains_the_source_image(items):
    # Every image a flat colour; the marker image is pure magenta, found nowhere else.
    batch = 12
    images = torch.rand(batch, 3, 1, 1, generator=torch.Generator().manual_seed(items)) * 0.5 + 0.25
    images = images.expand(batch, 3, SIZE, SIZE).clone()
    images[0] = torch.tensor([1.0, 0.0, 1.0])[:, None, None]
    augmentation = MultiItemMosaic(min_items=items, max_items=items, p=1.0, source=RandomSource(seed=items))
    for _ in range(3):
        out = augmentation(images)
        assert (augmentation._params["count"] == items).all()
        magenta = ((out - torch.tensor([1.0, 0.0, 1.0])[:, None, None]).abs().amax(1) < 1e-3)
        assert magenta[0].float().mean() > 0.02, "the source image is missing from its own mosaic"
        # Others contain the marker only when they drew it; their own image is always there.
        own = ((out - images[:, :, :1, :1]).abs().amax(1) < 1e-3).flatten(1).any(1)
        assert own.all()


def test_mosaic_layouts_have_one_to_six_tiles_inside_the_canvas():
    counts = {len(tiles) for tiles in LAYOUTS.values()}
    assert counts == set(range(1, MAX_ITEMS + 1))
    for tiles in LAYOUTS.values():
        assert all(0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 for x0, y0, x1, y1 in tiles)


def test_recipe_contract_uint8_float_channels_last(device):
    augment = ecomaug.build_recipe("ecom", seed=0, mosaic_p=0.5, watermark_p=0.5)
    uint8 = (_images(8, device) * 255).round().to(torch.uint8)
    for images in (uint8, uint8.float() / 255, uint8.contiguous(memory_format=torch.channels_last)):
        out = augment(images)
        assert out.shape == images.shape and out.dtype == torch.float32 and out.device.type == device.type
        assert out.min() >= 0 and out.max() <= 1
        assert set(augment.last_fired) >= {"perspective", "colour", "mosaic", "watermark", "grayscale", "blur",
                                           "flip"}
        assert all(f.dtype == torch.bool and f.shape == (8,) for f in augment.last_fired.values())
    channels_last = augment(uint8.contiguous(memory_format=torch.channels_last), params=augment.last_params)
    assert torch.equal(channels_last, augment(uint8, params=augment.last_params))


@pytest.mark.parametrize("name", ["ecom", "mocov2"])
def test_recipe_is_deterministic_and_views_differ(name):
    images = (_images(8) * 255).to(torch.uint8)
    first, second = ecomaug.build_recipe(name, seed=3), ecomaug.build_recipe(name, seed=3)
    view_a, view_b = first(images), first(images)
    assert torch.equal(view_a, second(images)) and torch.equal(view_b, second(images))
    assert not torch.equal(view_a, view_b), "the two views must get independent parameters"
    generator = torch.Generator().manual_seed(5)
    assert torch.equal(ecomaug.build_recipe(name, generator=generator)(images),
                       ecomaug.build_recipe(name, generator=torch.Generator().manual_seed(5))(images))


def test_recipe_overrides_and_errors():
    augment = ecomaug.build_recipe("ecom", seed=0, watermark_p=1.0, mosaic_p=0.0, perspective_p=0.0)
    augment((_images(4) * 255).to(torch.uint8))
    assert augment.last_fired["watermark"].all() and not augment.last_fired["mosaic"].any()
    with pytest.raises(ValueError, match="allowed: .*watermark_p"):
        ecomaug.build_recipe("ecom", watermark_probability=0.5)
    with pytest.raises(ValueError, match="unknown recipe"):
        ecomaug.build_recipe("simclr")
    with pytest.raises(ValueError, match="colour_p"):
        ecomaug.build_recipe("ecom", colour_p=1.5)
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        augment(torch.zeros(4, 1, 8, 8))
