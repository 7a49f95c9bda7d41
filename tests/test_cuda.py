"""Acceptance on a GPU: what only a CUDA device can check, as tests marked ``cuda``.

They skip, with one line saying why, where ``torch.cuda.is_available()`` is false, so CI stays
green. On a GPU machine: ``pytest -m cuda`` runs these and every case of the ``device``
fixture on CUDA. What they replace in the old ``bench/gpu_check.py`` (checks 1-8):

1. environment: torch sees CUDA, kornia and DALI's PyTorch iterator import (DALI is an extra:
   skipped when not installed); 2. the DALI loader with ``mixed`` decode, every GPU graph
   variant: two uint8 views of the right shape on the device; 3. the PyTorch loader into CUDA
   (pinned host memory); 4. the ``ecom`` recipe on CUDA: float32 in [0, 1] on the device,
   deterministic with ``seed=`` and with a device generator, channels_last input equal up to
   rounding; 5. the MoCo step under bf16 autocast and under fp16 with a GradScaler: finite
   losses; 6. the step fed by the real loader + recipe: finite loss; 7. training end to end on
   CUDA through the engine: checkpoint and export written; 8. the suite's CUDA cases: the
   ``device`` fixture's ``cuda`` parameter (marked ``cuda`` in ``conftest.py``).

The figures (images/s, the recipe's share of a step, loader-fed vs synthetic) are the
benchmark's: ``python -m bench gpu --device cuda``. No test here asserts a duration.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
BATCH, CROP = 8, 64


def check_views(batch, *, batch_size: int = BATCH, crop_size: int = CROP) -> None:
    assert len(batch.views) == 2
    for view in batch.views:
        assert view.device.type == "cuda" and view.dtype == torch.uint8
        assert tuple(view.shape) == (batch_size, 3, crop_size, crop_size)


def test_environment_sees_cuda_kornia_and_dali():
    import kornia  # noqa: F401

    assert torch.cuda.device_count() >= 1 and torch.cuda.get_device_properties(CUDA).total_memory > 0
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (the dali extra)")
    from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401


def test_dali_mixed_decode_every_gpu_variant_gives_uint8_views_on_cuda(sample_shards):
    from loaders.build import dali_available, make_options

    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed (the dali extra)")
    from loaders.dali_backend import DaliLoader, variants_for

    for variant in variants_for(True):
        loader = DaliLoader(make_options(sample_shards, device=CUDA, batch_size=BATCH, crop_size=CROP, seed=0,
                                         num_workers=2), variant=variant)
        check_views(next(iter(loader)))
        del loader


def test_torch_loader_pins_and_delivers_uint8_views_on_cuda(sample_shards):
    from loaders.build import make_options
    from loaders.torch_backend import TorchLoader

    loader = TorchLoader(make_options(sample_shards, device=CUDA, batch_size=BATCH, crop_size=CROP, seed=0,
                                      num_workers=1))
    check_views(next(iter(loader)))


def test_ecom_recipe_on_cuda_is_in_range_deterministic_and_layout_blind():
    from bench.augment import synthetic_batch
    from ecomaug.recipes import build_recipe

    images = synthetic_batch(BATCH, CROP, CUDA, seed=0)
    with torch.no_grad():
        out = build_recipe("ecom", seed=123)(images)
        assert out.device.type == "cuda" and out.dtype == torch.float32
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert torch.equal(out, build_recipe("ecom", seed=123)(images))
        by_generator = [build_recipe("ecom", generator=torch.Generator(device=CUDA).manual_seed(123))(images)
                        for _ in range(2)]
        assert torch.equal(*by_generator)
        channels_last = build_recipe("ecom", seed=123)(images.contiguous(memory_format=torch.channels_last))
    # convolutions may sum in another order in channels_last: equal up to float rounding
    assert float((channels_last - out).abs().max()) <= 1e-4


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_moco_step_under_autocast_keeps_the_loss_finite(sample_shards, amp):
    from bench.augment import synthetic_batch
    from bench.pieces import build_ecom_recipe, engine_step

    step = engine_step(sample_shards, model="test_resnet", device=CUDA, batch_size=BATCH, crop_size=CROP,
                       amp=amp, seed=0, queue_size=64, recipe=build_ecom_recipe(CUDA, seed=0))
    views = [synthetic_batch(BATCH, CROP, CUDA, seed=seed) for seed in (0, 1)]
    losses = [float(step(views).loss.detach()) for _ in range(4)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    if amp == "fp16":
        assert step.scaler.is_enabled() and step.scaler.get_scale() > 0


def test_step_fed_by_the_loader_and_recipe_on_cuda(sample_shards):
    from bench.pieces import build_ecom_recipe, engine_step, loader_stream
    from loaders.manifest import load_shard_set

    step = engine_step(sample_shards, model="test_resnet", device=CUDA, batch_size=BATCH, crop_size=CROP,
                       amp="bf16", seed=0, queue_size=64, recipe=build_ecom_recipe(CUDA, seed=0))
    stream, backend = loader_stream(load_shard_set(sample_shards), backend="auto", device=CUDA, batch_size=BATCH,
                                    crop_size=CROP, seed=0, workers=1, batches_needed=3)
    losses = [float(step(next(stream).views).loss.detach()) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))), (backend, losses)


@pytest.mark.slow
def test_training_on_cuda_writes_a_checkpoint_and_an_export(sample_shards, tmp_path):
    from ecomaug.config import parse_config
    from ecomaug.engine import train

    config = parse_config(["--data", str(sample_shards), "--out", str(tmp_path / "run"), "--device", "cuda",
                           "--model", "test_resnet", "--crop-size", str(CROP), "--batch-size", "16",
                           "--queue-size", "64", "--amp", "bf16", "--max-steps", "6", "--log-every", "2",
                           "--num-workers", "1", "--no-progress"])
    result = train(config)
    assert result.step == 6 and result.last_loss is not None and torch.isfinite(torch.tensor(result.last_loss))
    assert result.checkpoint is not None and result.checkpoint.is_file()
    assert result.export_dir is not None
    assert all((result.export_dir / name).is_file() for name in ("backbone.safetensors", "config.json"))
