"""Shard conversion: read-back with webdataset and DALI, index files, hygiene, sampling, jobs, hooks."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import loaders
from loaders.convert import convert_to_shards
from loaders.convert.inputs import input_key
from loaders.manifest import FORMAT_NAME, FORMAT_VERSION, iter_skipped, load_shard_set


def _photo(width: int, height: int, seed: int) -> Image.Image:
    generator = np.random.default_rng(seed)
    small = generator.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}


def _all_samples(out: Path) -> dict[str, tuple[dict, bytes]]:
    """key -> (json, jpeg bytes) over every tar in ``out``; fails on a key seen twice."""
    samples: dict[str, tuple[dict, bytes]] = {}
    for tar_path in sorted(out.glob("*.tar")):
        members = _members(tar_path)
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                assert meta["key"] not in samples, f"{meta['key']} written twice"
                samples[meta["key"]] = (meta, members[f"{meta['key']}.jpg"])
    return samples


def _csv_manifest(root: Path, groups: dict[str, int]) -> Path:
    """Synthetic images with a ``region`` column: ``groups`` maps region -> how many."""
    (root / "img").mkdir(parents=True)
    rows = []
    seed = 0
    for region, count in groups.items():
        for number in range(count):
            seed += 1
            name = f"img/{region}-{number}.jpg"
            _photo(72, 64, seed).save(root / name, "JPEG", quality=90)
            rows.append({"path": name, "item_id": 1000 + seed // 2, "region": region, "title": f"thing {seed}"})
    with open(root / "items.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["path", "item_id", "region", "title"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "items.csv"


def test_sample_read_back_with_webdataset(sample_shards, sample_manifest):
    import webdataset as wds

    shard_set = load_shard_set(sample_shards)
    with open(sample_manifest, newline="") as stream:
        rows = {row["path"]: row for row in csv.DictReader(stream)}
    assert shard_set.num_samples == len(rows) == shard_set.manifests[0]["totals"]["written"]
    dataset = wds.WebDataset([s.url for s in shard_set.shards], shardshuffle=False).decode("pil")
    keys = []
    for sample in dataset:
        image, meta = sample["jpg"], sample["json"]
        assert image.mode == "RGB" and image.size == (meta["width"], meta["height"])
        assert meta["key"] == sample["__key__"] == input_key(meta["source"])
        row = rows[meta["source"]]
        assert meta["item_id"] == row["item_id"] and isinstance(meta["item_id"], str)
        assert (meta["region"], meta["shop"], meta["title"]) == (row["region"], row["shop"], row["title"])
        keys.append(meta["key"])
    assert len(keys) == len(set(keys)) == len(rows)


def test_sample_read_back_with_dali_using_written_indexes(sample_shards):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    shard_set = load_shard_set(sample_shards)
    batch_size = 32

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None)
    def read_back():
        jpegs, metas = fn.readers.webdataset(
            paths=[s.url for s in shard_set.shards], index_paths=[s.index_path for s in shard_set.shards],
            ext=["jpg", "json"], missing_component_behavior="error", name="reader", pad_last_batch=True)
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), metas

    pipe = read_back()
    pipe.build()
    assert pipe.epoch_size("reader") == shard_set.num_samples
    keys = set()
    for _ in range(math.ceil(shard_set.num_samples / batch_size)):
        images, metas = pipe.run()
        for position in range(len(images)):
            pixels = np.array(images.at(position))
            meta = json.loads(bytes(np.array(metas.at(position))))
            assert pixels.shape == (meta["height"], meta["width"], 3) and pixels.dtype == np.uint8
            keys.add(meta["key"])
    assert len(keys) == shard_set.num_samples


def test_index_files_equal_dalis_own_wds2idx(sample_shards, tmp_path):
    tool = Path(sys.executable).with_name("wds2idx")
    if not tool.exists():
        pytest.skip("DALI's wds2idx is not installed next to this Python")
    shard = load_shard_set(sample_shards).shards[0]
    subprocess.run([str(tool), shard.url, str(tmp_path / "reference.idx")], check=True, capture_output=True)
    assert Path(shard.index_path).read_bytes() == (tmp_path / "reference.idx").read_bytes()


def test_sample_manifest_follows_the_format(sample_shards):
    manifest = json.loads((sample_shards / "manifest.json").read_text())
    assert manifest["format"] == FORMAT_NAME and manifest["format_version"] == FORMAT_VERSION
    assert {"ecomaug_version", "created", "input", "options", "job"} <= set(manifest)
    totals = manifest["totals"]
    assert totals["inputs"] == totals["written"] + totals["skipped"]
    assert [s["count"] for s in manifest["shards"]] == [64] * (totals["written"] // 64) + \
        ([totals["written"] % 64] if totals["written"] % 64 else [])
    for shard in manifest["shards"]:
        assert (sample_shards / shard["tar"]).stat().st_size == shard["bytes"]
        assert sum(shard["groups"]["region"].values()) == shard["count"]
    assert sum(manifest["groups"]["region"].values()) == totals["written"]
    assert not list(sample_shards.glob(".*")), "temporaries or the journal were left behind"


def test_resize_draft_and_pass_through(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    _photo(1000, 600, 1).save(source / "large.jpg", "JPEG", quality=92)
    _photo(200, 150, 2).save(source / "small.jpg", "JPEG", quality=85)
    _photo(200, 150, 3).save(source / "progressive.jpg", "JPEG", quality=85, progressive=True)
    rotated = _photo(200, 120, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated.save(source / "rotated.jpg", "JPEG", quality=90, exif=exif)

    report = convert_to_shards(source, tmp_path / "out", max_size=384, workers=0, progress=False)
    samples = {meta["source"]: (meta, jpeg) for meta, jpeg in _all_samples(tmp_path / "out").values()}
    assert report.passed_through == 1
    assert samples["small.jpg"][1] == (source / "small.jpg").read_bytes()
    assert (samples["large.jpg"][0]["width"], samples["large.jpg"][0]["height"]) == (384, 230)
    assert (samples["rotated.jpg"][0]["width"], samples["rotated.jpg"][0]["height"]) == (120, 200)
    progressive = Image.open(io.BytesIO(samples["progressive.jpg"][1]))
    assert not progressive.info.get("progressive") and progressive.size == (200, 150)
    large = np.asarray(Image.open(io.BytesIO(samples["large.jpg"][1])).convert("RGB")).astype(int)
    reference = np.asarray(_photo(1000, 600, 1).resize((384, 230), Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(large - reference).mean() < 6, "the DCT-downscaled image must still look the same"

    report = convert_to_shards(source, tmp_path / "shorter", max_size=120, resize_side="shorter",
                               workers=0, progress=False)
    sizes = {meta["source"]: (meta["width"], meta["height"])
             for meta, _ in _all_samples(tmp_path / "shorter").values()}
    assert sizes["large.jpg"] == (200, 120) and sizes["small.jpg"] == (160, 120)


def test_balance_by_samples_evenly_and_deterministically(tmp_path):
    manifest = _csv_manifest(tmp_path, {"ID": 9, "TH": 5, "VN": 3})

    def keys(out: str, seed: int, per_group: int | None = 3) -> set[str]:
        report = convert_to_shards(manifest, tmp_path / out, balance_by="region", per_group=per_group,
                                   seed=seed, shard_size=4, workers=0, progress=False)
        assert report.inputs == 17 == report.written + report.skipped
        assert report.skipped_by_reason == {"not sampled": 17 - report.written}
        written = json.loads((tmp_path / out / "manifest.json").read_text())["groups"]["region"]
        assert written == {"ID": 3, "TH": 3, "VN": 3}
        return set(_all_samples(tmp_path / out))

    first, again, other = keys("a", seed=0), keys("b", seed=0), keys("c", seed=1)
    assert first == again and first != other
    assert keys("d", seed=0, per_group=None) == first  # default: the smallest group's size (3)


def test_jobs_together_equal_one_run(tmp_path):
    manifest = _csv_manifest(tmp_path, {"ID": 12, "TH": 11})
    single = convert_to_shards(manifest, tmp_path / "single", shard_size=5, workers=0, progress=False)
    split = tmp_path / "split"
    for job in range(3):
        report = convert_to_shards(manifest, split, shard_size=5, num_jobs=3, job_index=job, workers=0,
                                   progress=False)
        assert (split / f"manifest-j{job:03d}.json").exists() and (split / f"skipped-j{job:03d}.jsonl").exists()
        assert all(p.name.startswith(f"shard-j{job:03d}-")
                   for p in split.glob(f"shard-j{job:03d}-*"))
        assert report.inputs < single.inputs
    merged = load_shard_set(split)
    assert merged.num_samples == single.written
    assert set(_all_samples(split)) == set(_all_samples(tmp_path / "single"))
    assert {s.url.rsplit("/", 1)[1][:10] for s in merged.shards} == {"shard-j000", "shard-j001", "shard-j002"}


def test_shard_bytes_caps_every_shard(tmp_path):
    manifest = _csv_manifest(tmp_path, {"ID": 12})
    limit = 20_000
    report = convert_to_shards(manifest, tmp_path / "out", shard_size=100, shard_bytes=limit, workers=0,
                               progress=False)
    shards = json.loads((tmp_path / "out" / "manifest.json").read_text())["shards"]
    assert len(shards) > 1 and sum(s["count"] for s in shards) == report.written == 12
    assert all(s["bytes"] <= limit for s in shards)


def black_corner_hook(image: Image.Image):
    """A picklable image_hook: blacks out the top-left corner of every other image."""
    if hashlib.sha1(image.tobytes()).digest()[0] % 2:
        return image, {"hooked": False}, False
    image = image.copy()
    image.paste((0, 0, 0), (0, 0, 16, 16))
    return image, {"hooked": True, "key": "must not override"}, True


def test_image_hook_changes_pixels_meta_and_counts(tmp_path):
    manifest = _csv_manifest(tmp_path, {"ID": 10})
    report = convert_to_shards(manifest, tmp_path / "out", workers=1, progress=False,
                               image_hook=black_corner_hook)
    samples = _all_samples(tmp_path / "out")
    hooked = [key for key, (meta, _) in samples.items() if meta["hooked"]]
    assert 0 < len(hooked) < 10 and report.changed == len(hooked)
    assert report.passed_through == 10 - len(hooked)
    for key, (meta, jpeg) in samples.items():
        assert meta["key"] == key
        corner = np.asarray(Image.open(io.BytesIO(jpeg)))[2:12, 2:12]
        assert (corner.max() < 40) == meta["hooked"]
    totals = json.loads((tmp_path / "out" / "manifest.json").read_text())["totals"]
    assert totals["changed"] == len(hooked)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["options"]["image_hook"].endswith(
        "black_corner_hook")


class TaggedHook:
    """A hook object that states its settings in its repr, as Dewatermarker does."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __call__(self, image: Image.Image):
        return image, {}, False

    def __repr__(self) -> str:
        return f"TaggedHook(tag={self.tag!r})"


def test_a_rerun_with_other_hook_settings_is_refused(tmp_path):
    manifest = _csv_manifest(tmp_path, {"ID": 3})
    convert_to_shards(manifest, tmp_path / "out", workers=0, progress=False, image_hook=TaggedHook("a"))
    options = json.loads((tmp_path / "out" / "manifest.json").read_text())["options"]
    assert options["image_hook"] == "TaggedHook(tag='a')"
    with pytest.raises(ValueError, match="image_hook"):
        convert_to_shards(manifest, tmp_path / "out", workers=0, progress=False, image_hook=TaggedHook("b"))


def test_jsonl_manifest_repeats_and_missing_files(tmp_path):
    (tmp_path / "img").mkdir()
    for number in range(3):
        _photo(80, 60, number).save(tmp_path / "img" / f"{number}.jpg", "JPEG")
    rows = [{"path": "img/0.jpg", "item_id": 7}, {"path": "img/1.jpg", "item_id": 8, "extra": [1, 2]},
            {"path": "img/0.jpg", "item_id": 7}, {"path": "img/gone.jpg"}, {"path": "img/2.jpg"}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = convert_to_shards(tmp_path / "items.jsonl", tmp_path / "out", workers=0, progress=False)
    assert (report.inputs, report.written, report.skipped) == (5, 3, 2)
    reasons = {record["reason"]: record for record in iter_skipped(tmp_path / "out")}
    assert reasons["repeated input"]["duplicate_of"] == input_key("img/0.jpg")
    assert reasons["missing file"]["source"] == "img/gone.jpg"
    metas = {meta["source"]: meta for meta, _ in _all_samples(tmp_path / "out").values()}
    assert metas["img/0.jpg"]["item_id"] == "7" and metas["img/1.jpg"]["extra"] == [1, 2]


def test_convert_is_exported_from_loaders():
    assert loaders.convert_to_shards is convert_to_shards
