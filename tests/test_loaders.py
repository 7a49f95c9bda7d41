"""build_loader on the bundled sample: both backends, same contract; order, resume, eval, errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import loaders
from loaders.build import choose_backend, dali_available
from loaders.manifest import load_shard_set

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
BACKENDS = ["torch", pytest.param("dali", marks=needs_dali)]
SAMPLES = 320  # bundled sample: 320 images, shards of 64


def collect(shards, backend, **options):
    settings = {"device": "cpu", "batch_size": 32, "crop_size": 64, "seed": 0,
                "num_workers": 0 if backend == "torch" else 2}
    settings.update(options)
    loader = loaders.build_loader(shards, backend=backend, **settings)
    return loader, [(batch.keys, [view.clone() for view in batch.views], batch.meta) for batch in loader]


def keys_of(batches):
    return [key for keys, _, _ in batches for key in keys]


@needs_dali
def test_backends_yield_same_shapes_dtypes_and_keys(sample_shards):
    results = {backend: collect(sample_shards, backend, drop_last=False) for backend in ("torch", "dali")}
    (torch_loader, torch_batches), (dali_loader, dali_batches) = results["torch"], results["dali"]
    assert (torch_loader.backend, dali_loader.backend) == ("torch", "dali-cpu")
    assert len(torch_loader) == len(dali_loader) == len(torch_batches) == len(dali_batches) == 10
    assert sorted(keys_of(torch_batches)) == sorted(keys_of(dali_batches))
    assert len(set(keys_of(torch_batches))) == SAMPLES
    for (t_keys, t_views, t_meta), (d_keys, d_views, d_meta) in zip(torch_batches, dali_batches):
        assert len(t_views) == len(d_views) == 2
        for t_view, d_view in zip(t_views, d_views):
            assert t_view.shape == d_view.shape == (len(t_keys), 3, 64, 64)
            assert t_view.dtype == d_view.dtype == torch.uint8
            assert t_view.device == d_view.device == torch.device("cpu")
        assert [m["key"] for m in t_meta] == t_keys and [m["key"] for m in d_meta] == d_keys
        assert all(isinstance(m["item_id"], str) for m in t_meta + d_meta)
    # the two views are independent crops, not copies
    assert not torch.equal(torch_batches[0][1][0], torch_batches[0][1][1])
    assert not torch.equal(dali_batches[0][1][0], dali_batches[0][1][1])


@needs_dali
def test_eval_mode_is_the_same_ordered_centre_crop_in_both_backends(sample_shards):
    _, torch_batches = collect(sample_shards, "torch", mode="eval", batch_size=48)
    _, dali_batches = collect(sample_shards, "dali", mode="eval", batch_size=48)
    stored_order = []
    for shard in load_shard_set(sample_shards).shards:
        lines = open(shard.index_path, encoding="utf-8").read().splitlines()[1:]
        stored_order += [line.split()[3].split(".")[0] for line in lines]
    assert keys_of(torch_batches) == keys_of(dali_batches) == stored_order  # every sample once, in order
    assert [len(k) for k, _, _ in torch_batches] == [48] * 6 + [32]  # no drop in eval
    torch_pixels = torch.cat([views[0] for _, views, _ in torch_batches]).float()
    dali_pixels = torch.cat([views[0] for _, views, _ in dali_batches]).float()
    assert all(len(views) == 1 for _, views, _ in torch_batches + dali_batches)
    # Pillow and DALI resample a little differently, but it is the same centre square
    assert (torch_pixels - dali_pixels).abs().mean() < 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_batches_other_seed_or_epoch_other_order(sample_shards, backend):
    _, first = collect(sample_shards, backend, seed=5)
    _, again = collect(sample_shards, backend, seed=5)
    _, other_seed = collect(sample_shards, backend, seed=6)
    _, other_epoch = collect(sample_shards, backend, seed=5, epoch=1)
    assert keys_of(first) == keys_of(again)
    assert all(torch.equal(a, b) for (_, x, _), (_, y, _) in zip(first, again) for a, b in zip(x, y))
    assert keys_of(first) != keys_of(other_seed)
    assert keys_of(first) != keys_of(other_epoch)
    assert set(keys_of(first)) == set(keys_of(other_epoch))  # an epoch still covers every sample


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_start_batch_gives_the_remaining_batches(sample_shards, backend):
    full_loader, full = collect(sample_shards, backend, seed=3, epoch=2)
    resumed_loader, resumed = collect(sample_shards, backend, seed=3, epoch=2, start_batch=4)
    assert len(resumed_loader) == len(full_loader) - 4 == len(resumed)
    for (keys, views, _), (full_keys, full_views, _) in zip(resumed, full[4:]):
        assert keys == full_keys
        assert all(torch.equal(a, b) for a, b in zip(views, full_views))


def test_torch_resume_with_workers_matches_the_uninterrupted_run(sample_shards):
    # two workers hand over chunks round robin; the resumed run must start mid-stream exactly
    _, full = collect(sample_shards, "torch", seed=1, num_workers=2, batch_size=24, drop_last=False)
    _, resumed = collect(sample_shards, "torch", seed=1, num_workers=2, batch_size=24,
                         drop_last=False, start_batch=5)
    assert [k for k, _, _ in resumed] == [k for k, _, _ in full[5:]]
    assert all(torch.equal(a, b) for (_, x, _), (_, y, _) in zip(resumed, full[5:]) for a, b in zip(x, y))
    assert len(set(keys_of(full))) == SAMPLES


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_last_yields_len_full_batches(sample_shards, backend):
    loader, batches = collect(sample_shards, backend, batch_size=48)
    assert len(loader) == len(batches) == SAMPLES // 48
    assert all(len(keys) == 48 for keys, _, _ in batches)


def test_remote_url_needs_a_sample_count_then_reads_through_webdataset(sample_shards):
    shard = load_shard_set(sample_shards).shards[0]
    url = f"pipe:cat {shard.url}"
    with pytest.raises(ValueError, match="epoch_samples"):
        loaders.build_loader(url, backend="torch", device="cpu", batch_size=16)
    loader, batches = collect(url, "torch", batch_size=16, epoch_samples=64)
    assert loader.backend == "torch" and len(loader) == len(batches) == 4
    assert len(set(keys_of(batches))) == 64


@needs_dali
def test_dali_refuses_urls_and_auto_falls_back_to_torch(sample_shards, caplog):
    url = "pipe:cat " + load_shard_set(sample_shards).shards[0].url
    with pytest.raises(ValueError, match="local files"):
        loaders.build_loader(url, backend="dali", device="cpu", batch_size=16)
    with caplog.at_level(logging.INFO, logger="loaders.build"):
        assert choose_backend("auto", torch.device("cpu"), load_shard_set(url)) == "torch"
        assert choose_backend("auto", torch.device("cpu"), load_shard_set(sample_shards)) == "dali-cpu"
        assert choose_backend("auto", torch.device("cuda"), load_shard_set(sample_shards)) == "dali-gpu"
    assert "remote shards" in caplog.text and "dali-cpu" in caplog.text


@pytest.mark.parametrize("bad, match", [
    ({"backend": "tensorflow"}, "backend"), ({"corrupt": "ignore"}, "corrupt"),
    ({"mode": "test"}, "mode"), ({"batch_size": 0}, "batch_size"), ({"scale": (0.5, 0.2)}, "scale"),
    ({"rank": 2, "world_size": 2}, "rank"), ({"start_batch": 99}, "start_batch"),
    ({"batch_size": 400}, "drop_last"),
])
def test_bad_options_raise_value_error_naming_them(sample_shards, bad, match):
    options = {"backend": "torch", "device": "cpu", "batch_size": 32}
    options.update(bad)
    with pytest.raises(ValueError, match=match):
        loaders.build_loader(sample_shards, **options)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", BACKENDS)
def test_views_land_on_cuda(sample_shards, backend):
    loader = loaders.build_loader(sample_shards, backend=backend, device="cuda", batch_size=32,
                                  crop_size=64, num_workers=2)
    batch = next(iter(loader))
    assert loader.backend == ("torch" if backend == "torch" else "dali-gpu")
    assert all(view.device.type == "cuda" and view.dtype == torch.uint8 for view in batch.views)


DALI_CPU_VARIANTS = ["decode_once", "crop_decode", "torch_crops"]


@needs_dali
@pytest.mark.parametrize("variant", DALI_CPU_VARIANTS)
def test_every_dali_cpu_variant_keeps_the_contract(sample_shards, variant):
    loader, batches = collect(sample_shards, "dali", dali_variant=variant, drop_last=False, seed=4)
    _, again = collect(sample_shards, "dali", dali_variant=variant, drop_last=False, seed=4)
    resumed_loader, resumed = collect(sample_shards, "dali", dali_variant=variant, drop_last=False,
                                      seed=4, start_batch=7)
    assert loader.variant == variant and len(loader) == len(batches) == 10
    assert sorted(keys_of(batches)) == sorted(set(keys_of(batches))) and len(keys_of(batches)) == SAMPLES
    for keys, views, meta in batches:
        assert [m["key"] for m in meta] == keys and all("item_id" in m for m in meta)
        assert all(v.shape == (len(keys), 3, 64, 64) and v.dtype == torch.uint8 for v in views)
        assert not torch.equal(views[0], views[1])  # two independent crops
    assert [k for k, _, _ in again] == [k for k, _, _ in batches]
    assert all(torch.equal(a, b) for (_, x, _), (_, y, _) in zip(again, batches) for a, b in zip(x, y))
    assert len(resumed_loader) == len(resumed) == 3
    assert all(torch.equal(a, b) for (_, x, _), (_, y, _) in zip(resumed, batches[7:]) for a, b in zip(x, y))


@needs_dali
def test_torch_crops_views_own_their_memory(sample_shards):
    # the images are read in place from DALI's output buffers: views kept from earlier batches
    # must not change when the pipeline reuses those buffers
    kept = list(loaders.build_loader(sample_shards, backend="dali", device="cpu", batch_size=32,
                                     crop_size=64, seed=2, num_workers=2, dali_variant="torch_crops"))
    _, cloned = collect(sample_shards, "dali", seed=2, dali_variant="torch_crops")
    assert len(kept) == len(cloned) == SAMPLES // 32
    assert all(torch.equal(a, b) for batch, (_, views, _) in zip(kept, cloned)
               for a, b in zip(batch.views, views))


def test_resize_crops_matches_torchvision_resized_crop():
    from torchvision.transforms.v2 import functional as TF

    from loaders.dali_backend import resize_crops

    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator)
              for h, w in ((120, 90), (64, 200), (300, 300))]
    anchors = np.array([[10, 5], [0, 37], [44, 0]], dtype=np.int32)
    shapes = np.array([[100, 80], [64, 150], [256, 300]], dtype=np.int32)
    (view,) = resize_crops(images, [(anchors, shapes)], 48)
    assert view.shape == (3, 3, 48, 48) and view.dtype == torch.uint8
    for image, row, (top, left), (height, width) in zip(images, view, anchors, shapes):
        expected = TF.resized_crop(image.permute(2, 0, 1), int(top), int(left), int(height), int(width),
                                   [48, 48], antialias=True)
        assert (row.int() - expected.int()).abs().max() <= 1


@needs_dali
def test_torch_crops_is_refused_on_the_gpu(sample_shards):
    from loaders.build import make_options
    from loaders.dali_backend import DaliLoader

    with pytest.raises(ValueError, match="torch_crops.*CPU"):
        DaliLoader(make_options(sample_shards, device="cuda", batch_size=8), variant="torch_crops")
    with pytest.raises(ValueError, match="variant must be one of"):
        loaders.build_loader(sample_shards, backend="dali", device="cpu", batch_size=8, dali_variant="fast")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size,drop_last,mode", [(1, True, "train"), (3, True, "train"),
                                                       (2, False, "train"), (2, True, "eval")])
def test_epoch_plan_is_the_loader_length_without_building_one(sample_shards, backend, world_size,
                                                              drop_last, mode):
    for rank in range(world_size):
        plan = loaders.epoch_plan(sample_shards, batch_size=24, rank=rank, world_size=world_size,
                                  epoch=2, drop_last=drop_last, mode=mode)
        loader, batches = collect(sample_shards, backend, batch_size=24, rank=rank, world_size=world_size,
                                  epoch=2, drop_last=drop_last, mode=mode)
        assert plan.num_batches == len(loader) == len(batches)
    # the batch count does not depend on the epoch or the seed
    assert loaders.epoch_plan(sample_shards, batch_size=24, epoch=7, seed=3).num_batches == SAMPLES // 24


def test_endless_batches_run_past_the_epoch_end_and_refuse_an_empty_epoch(sample_shards):
    built = []

    def make_loader(epoch):
        built.append(epoch)
        return loaders.build_loader(sample_shards, backend="torch", device="cpu", batch_size=100,
                                    crop_size=32, epoch=epoch, num_workers=0)

    stream = loaders.endless_batches(make_loader, start_epoch=4)
    batches = [next(stream) for _ in range(7)]  # 3 batches an epoch: three epochs
    assert built == [4, 5, 6] and all(len(batch) == 100 for batch in batches)
    with pytest.raises(ValueError, match="yielded no batch"):
        next(loaders.endless_batches(lambda epoch: []))


def test_choose_backend_is_one_decision_for_every_caller(sample_shards):
    assert choose_backend("torch", "cpu") == "torch"
    expected = "dali-cpu" if dali_available() else "torch"
    assert choose_backend("auto", "cpu", load_shard_set(sample_shards)) == expected
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("tensorflow", "cpu")
