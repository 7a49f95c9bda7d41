"""A corrupt JPEG inside a shard is skipped and counted, or raises naming the shard and key."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import loaders
from loaders.build import dali_available
from loaders import shard_check
from loaders.shard_check import check_shard, jpeg_problem
from loaders.manifest import write_json_atomic

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
BACKENDS = ["torch", pytest.param("dali", marks=needs_dali)]
WDS2IDX = Path(sys.executable).with_name("wds2idx")


def good_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)
    stream = io.BytesIO()
    Image.fromarray(pixels).resize((96, 80)).save(stream, "JPEG", quality=85)
    return stream.getvalue()


def corruptions() -> dict[str, bytes]:
    good = good_jpeg(99)
    middle = len(good) // 2
    return {"truncated": good[:middle],
            "not-a-jpeg": b"<html>404 not found</html>" * 20,
            "bad-marker": good[:middle] + b"\xff\x05\xff\x31" + good[middle + 4:]}


def write_shards(out: Path, shards: list[list[tuple[str, bytes]]]) -> Path:
    """Write ``(key, jpeg)`` samples as shards with DALI indexes and a manifest."""
    import webdataset

    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for number, samples in enumerate(shards):
        tar = out / f"shard-{number:06d}.tar"
        with webdataset.TarWriter(str(tar)) as writer:
            for key, data in samples:
                meta = {"key": key, "source": f"{key}.jpg", "width": 96, "height": 80, "item_id": key}
                writer.write({"__key__": key, "jpg": data, "json": json.dumps(meta).encode()})
        subprocess.run([str(WDS2IDX), str(tar), str(tar.with_suffix(".idx"))], check=True,
                       capture_output=True)
        entries.append({"tar": tar.name, "index": tar.with_suffix(".idx").name, "count": len(samples),
                        "bytes": tar.stat().st_size, "groups": {}})
    total = sum(len(samples) for samples in shards)
    write_json_atomic(out / "manifest.json", {
        "format": "ecomaug-shards", "format_version": 1, "ecomaug_version": "test",
        "created": "2024-01-01T00:00:00+00:00", "input": "synthetic", "options": {},
        "job": {"index": 0, "count": 1}, "shards": entries, "groups": {},
        "totals": {"inputs": total, "written": total, "skipped": 0, "bytes": 0, "skipped_by_reason": {}}})
    return out


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Two shards of 12 samples; three samples (one per corruption) are broken JPEGs."""
    bad_keys: dict[str, str] = {}
    broken = iter(corruptions().items())
    shards = []
    for shard in range(2):
        samples = []
        for index in range(12):
            key = f"s{shard}k{index:02d}"
            data = good_jpeg(shard * 100 + index)
            if index in (3, 8) and len(bad_keys) < 3:
                reason, data = next(broken)
                bad_keys[key] = reason
            samples.append((key, data))
        shards.append(samples)
    return write_shards(tmp_path_factory.mktemp("corrupt_shards"), shards), bad_keys


def test_jpeg_check_flags_each_corruption_and_passes_a_good_jpeg():
    assert jpeg_problem(good_jpeg(0)) is None
    assert jpeg_problem(good_jpeg(0) + b"\0\0\0") is None  # zero padding after EOI is fine
    problems = {name: jpeg_problem(data) for name, data in corruptions().items()}
    assert "truncated" in problems["truncated"]
    assert "not a JPEG" in problems["not-a-jpeg"]
    assert "reserved marker" in problems["bad-marker"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_counts_corrupt_samples_and_never_yields_them(corrupt_shards, backend):
    shards, bad_keys = corrupt_shards
    loader = loaders.build_loader(shards, backend=backend, device="cpu", batch_size=4, crop_size=32,
                                  seed=0, corrupt="skip", drop_last=True,
                                  num_workers=0 if backend == "torch" else 1)
    batches = [batch for batch in loader]
    keys = [key for batch in batches for key in batch.keys]
    assert len(batches) == len(loader)  # the promised number of batches, corrupt samples or not
    assert loader.corrupt_count == len(bad_keys) == 3
    assert not set(keys) & set(bad_keys)
    assert all(batch.views[0].shape == (4, 3, 32, 32) for batch in batches)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_skips_corrupt_samples_and_yields_every_good_one_once(corrupt_shards, backend):
    shards, bad_keys = corrupt_shards
    loader = loaders.build_loader(shards, backend=backend, device="cpu", batch_size=5, crop_size=32,
                                  mode="eval", num_workers=0 if backend == "torch" else 1)
    keys = [key for batch in loader for key in batch.keys]
    assert sorted(keys) == sorted(f"s{s}k{i:02d}" for s in range(2) for i in range(12)
                                  if f"s{s}k{i:02d}" not in bad_keys)
    assert loader.corrupt_count == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_raise_names_the_shard_and_the_key(corrupt_shards, backend):
    shards, bad_keys = corrupt_shards
    with pytest.raises(ValueError) as caught:
        loader = loaders.build_loader(shards, backend=backend, device="cpu", batch_size=4,
                                      crop_size=32, corrupt="raise", mode="eval",
                                      num_workers=0 if backend == "torch" else 1)
        for _ in loader:
            pass
    message = str(caught.value)
    assert "shard-000000.tar" in message and "s0k03" in message  # the first corrupt sample in order


def undefined_table_jpeg() -> bytes:
    """Sound segments, but the luma component uses a quantisation table never defined: only
    decoding fails (a zero frame height, once used here, is now found by the check)."""
    data = bytearray(good_jpeg(7))
    frame = data.find(b"\xff\xc0")
    data[frame + 12] = 3  # the first component's table selector
    return bytes(data)


@pytest.mark.parametrize("variant", ["decode_once", "torch_crops"])
@needs_dali
def test_a_decode_error_the_check_cannot_see_names_the_shard_and_key(tmp_path, variant):
    bad = undefined_table_jpeg()
    assert jpeg_problem(bad) is None  # the structural check cannot see it
    samples = [(f"k{i:02d}", bad if i == 5 else good_jpeg(i)) for i in range(8)]
    shards = write_shards(tmp_path, [samples])
    loader = loaders.build_loader(shards, backend="dali", device="cpu", batch_size=4, crop_size=32,
                                  shuffle_buffer=0, num_workers=1, dali_variant=variant)
    with pytest.raises(RuntimeError) as caught:
        for _ in loader:
            pass
    message = str(caught.value)
    assert "shard-000000.tar" in message and "'k05'" in message and "batch 1" in message
    # the PyTorch backend's decoder fails on the sample itself: skipped and counted (in training
    # a good sample stands in for it, so the batch keeps its size)
    loader = loaders.build_loader(shards, backend="torch", device="cpu", batch_size=4, crop_size=32,
                                  shuffle_buffer=0, num_workers=0)
    keys = [key for batch in loader for key in batch.keys]
    assert len(keys) == 8 and set(keys) == {f"k{i:02d}" for i in range(8) if i != 5}
    assert loader.corrupt_count == 1


def test_shard_checks_are_remembered_on_disk_until_the_shard_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("ECOMAUG_CACHE_DIR", str(tmp_path / "cache"))
    broken = corruptions()["truncated"]
    shards = write_shards(tmp_path / "shards", [[(f"k{i}", broken if i == 2 else good_jpeg(i)) for i in range(5)]])
    tar, index = str(shards / "shard-000000.tar"), str(shards / "shard-000000.idx")
    shard_check._check_shard_cached.cache_clear()
    kept, corrupt = check_shard(tar, index)
    assert len(kept) == 4 and corrupt == [("k2", "truncated JPEG (no EOI marker at the end)")]
    assert len(list((tmp_path / "cache" / "shard-checks").glob("*.json"))) == 1

    def must_not_read(*_):
        raise AssertionError("the shard was read again")

    shard_check._check_shard_cached.cache_clear()  # a new process: only the disk remembers
    with monkeypatch.context() as patch:
        patch.setattr(shard_check, "_find_corrupt", must_not_read)
        assert check_shard(tar, index) == (kept, corrupt)
    stat = Path(tar).stat()
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the shard was rewritten
    with monkeypatch.context() as patch:
        patch.setattr(shard_check, "_find_corrupt", must_not_read)
        with pytest.raises(AssertionError, match="read again"):
            check_shard(tar, index)


def test_an_unwritable_check_cache_warns_once_and_still_checks(tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("ECOMAUG_CACHE_DIR", str(tmp_path / "file" / "cache"))
    shards = write_shards(tmp_path / "shards", [[("a", good_jpeg(1)), ("b", b"not a jpeg at all")]])
    shard_check._check_shard_cached.cache_clear()
    shard_check._warn_unwritable.cache_clear()
    with caplog.at_level("WARNING", logger="loaders.shard_check"):
        kept, corrupt = check_shard(str(shards / "shard-000000.tar"), str(shards / "shard-000000.idx"))
    assert len(kept) == 1 and corrupt == [("b", "not a JPEG (no SOI marker)")]
    assert "cannot keep shard checks" in caplog.text and "ECOMAUG_CACHE_DIR" in caplog.text


@needs_dali
def test_each_rank_starts_checking_at_its_own_share(corrupt_shards, monkeypatch):
    from loaders import dali_backend

    shards, _ = corrupt_shards
    order = []
    real = dali_backend.check_shard
    monkeypatch.setattr(dali_backend, "check_shard", lambda tar, index: order.append(Path(tar).name) or real(tar, index))
    for rank in (0, 1):
        loaders.build_loader(shards, backend="dali", device="cpu", batch_size=2, rank=rank, world_size=2)
    assert order == ["shard-000000.tar", "shard-000001.tar", "shard-000001.tar", "shard-000000.tar"]
