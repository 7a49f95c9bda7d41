"""One pool, one loader, both directions: a team's three marks are what training pastes and what dewatermark removes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ecomaug.augmentation import RandomSource, WatermarkOverlay
from ecomaug.dewatermark import Dewatermarker, MarkPool, scale_grid
from ecomaug.marks import load_marks
from ecomaug.recipe_config import resolve_recipe
from ecomaug.recipes import build_recipe_from_spec
from ecomaug.watermark_pool import load_watermark_pool

EXAMPLE_POOL = Path(__file__).resolve().parents[1] / "docs" / "examples" / "my_marks"
NAMES = ["blue-badge", "ring-logo", "text-kedai-rina"]  # a JPEG without alpha, a PNG with alpha, a text mark


@pytest.fixture()
def user_pool(tmp_path) -> Path:
    pool = tmp_path / "my_marks"
    shutil.copytree(EXAMPLE_POOL, pool)
    (pool / "notes.txt").write_text("not a mark")
    return pool


def _photo(size: int = 256) -> torch.Tensor:
    """A light studio gradient with a saturated object in the middle, (1, 3, S, S) in [0, 1]."""
    ramp = torch.linspace(0.95, 0.8, size)[None, :, None].expand(3, size, size).clone()
    ramp[:, 96:160, 96:160] = torch.tensor([0.2, 0.6, 0.3])[:, None, None]
    return ramp[None]


def _paste(pool, mark: int) -> Image.Image:
    overlay = WatermarkOverlay(pool, placements=["corner"], scale=(0.4, 0.4), opacity=(1.0, 1.0),
                               degrees=(0.0, 0.0), recolour_p=0.0, p=1.0, source=RandomSource(seed=mark))
    params = overlay.forward_parameters(torch.Size((1, 3, 256, 256)))
    # That mark, at its own aspect (height / width), in the bottom-right corner.
    height = 0.4 * float(overlay._param_generator.pool_aspect[mark])
    params["mark"] = torch.tensor([mark])
    params["size"], params["centre"] = torch.tensor([[0.4, height]]), torch.tensor([[0.75, 0.96 - height / 2]])
    marked = overlay(_photo(), params=params)
    return Image.fromarray((marked[0].permute(1, 2, 0) * 255).round().byte().numpy())


def test_training_draws_only_from_the_user_pool(user_pool):
    spec = resolve_recipe("ecom", watermark_dir=user_pool, settings=["watermark_p=1.0"])
    assert spec.options["watermark_dir"] == str(user_pool.resolve())
    augment = build_recipe_from_spec(spec, seed=0)
    assert augment.stages["watermark"].pool.names == NAMES  # the bundled 23 marks are not mixed in
    augment((torch.rand(8, 3, 64, 64) * 255).to(torch.uint8))
    assert augment.last_fired["watermark"].all()
    assert set(augment.last_params["watermark"]["mark"].tolist()) <= {0, 1, 2}


def test_overlay_and_remover_read_the_same_marks(user_pool):
    remover_pool = MarkPool.from_directory(user_pool)
    assert remover_pool.names == NAMES == [name for name, _ in load_marks(user_pool)]
    badge = remover_pool.marks[0]
    # No alpha in the JPEG: its white background is keyed out for both, not taken as an opaque box.
    assert badge.size[0] < 220 and badge.size[1] < 90 and float(badge.alpha.min()) < 0.05


def test_dewatermark_removes_what_training_pasted_and_nothing_else(user_pool):
    pool = load_watermark_pool(user_pool)
    # Below the default 0.85: a resampled JPEG badge with fine white text scores ~0.8 (measure your own pool
    # with bench.dewatermark_pr); the bundled marks and the clean photo stay far below (~0.4).
    remover = Dewatermarker(MarkPool.from_directory(user_pool), scales=scale_grid(0.2, 1.0), threshold=0.7)
    for index, name in enumerate(NAMES):
        marked = _paste(pool, index)
        cleaned, meta, changed = remover(marked)
        assert changed, name
        assert [hit["mark"] for hit in meta["dewatermark"]["found"]] == [name]
        clean = np.asarray(_paste_nothing())
        assert np.abs(np.asarray(cleaned, np.float32) - clean).mean() < \
            0.3 * np.abs(np.asarray(marked, np.float32) - clean).mean()
    assert not remover(_paste_nothing())[2]  # a clean photo passes untouched
    bundled = load_watermark_pool(None)
    for index in range(0, len(bundled), 6):  # marks of the bundled pool are not this pool's to remove
        _, _, changed = remover(_paste(bundled, index))
        assert not changed, bundled.names[index]


def _paste_nothing() -> Image.Image:
    return Image.fromarray((_photo()[0].permute(1, 2, 0) * 255).round().byte().numpy())
