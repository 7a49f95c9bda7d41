"""A corrupt JPEG inside a shard is skipped and counted, or raises naming the shard and key."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import loaders
from loaders.build import dali_available
from loaders.dali_backend import jpeg_problem
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


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Two shards of 12 samples; three samples (one per corruption) are broken JPEGs."""
    import webdataset

    out = tmp_path_factory.mktemp("corrupt_shards")
    bad_keys: dict[str, str] = {}
    entries = []
    broken = iter(corruptions().items())
    for shard in range(2):
        tar = out / f"shard-{shard:06d}.tar"
        with webdataset.TarWriter(str(tar)) as writer:
            for index in range(12):
                key = f"s{shard}k{index:02d}"
                data = good_jpeg(shard * 100 + index)
                if index in (3, 8) and len(bad_keys) < 3:
                    reason, data = next(broken)
                    bad_keys[key] = reason
                meta = {"key": key, "source": f"{key}.jpg", "width": 96, "height": 80, "item_id": key}
                writer.write({"__key__": key, "jpg": data, "json": json.dumps(meta).encode()})
        subprocess.run([str(WDS2IDX), str(tar), str(tar.with_suffix(".idx"))], check=True,
                       capture_output=True)
        entries.append({"tar": tar.name, "index": tar.with_suffix(".idx").name, "count": 12,
                        "bytes": tar.stat().st_size, "groups": {}})
    write_json_atomic(out / "manifest.json", {
        "format": "ecomaug-shards", "format_version": 1, "ecomaug_version": "test",
        "created": "2024-01-01T00:00:00+00:00", "input": "synthetic", "options": {},
        "job": {"index": 0, "count": 1}, "shards": entries, "groups": {},
        "totals": {"inputs": 24, "written": 24, "skipped": 0, "bytes": 0, "skipped_by_reason": {}}})
    return out, bad_keys


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
