"""Hostile images and names: trailers, undecodable names, too-small data, and one reader for all."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import loaders
from loaders.convert import convert_to_shards
from loaders.convert.hygiene import HygieneOptions, Prepared, Rejected, prepare_image, read_image
from loaders.convert.inputs import input_key, list_image_files
from loaders.convert.jpeg_structure import jpeg_layout
from loaders.manifest import iter_skipped
from loaders.shard_check import check_shard

needs_undecodable_names = pytest.mark.skipif(sys.platform in ("win32", "darwin"),
                                             reason="the file system must accept any bytes in a name")


def photo(width: int, height: int, seed: int) -> Image.Image:
    generator = np.random.default_rng(seed)
    coarse = generator.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16)
    return Image.fromarray(np.clip(base + generator.integers(-15, 16, (height, width, 1)), 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, **save) -> bytes:
    stream = io.BytesIO()
    image.save(stream, "JPEG", quality=90, **save)
    return stream.getvalue()


def shard_samples(out: Path) -> dict[str, tuple[dict, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive:
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = archive.extractfile(member).read()
    return {json.loads(parts["json"])["source"]: (json.loads(parts["json"]), parts["jpg"])
            for parts in samples.values()}


# ----------------------------------------------------------------------------- trailers after EOI
def test_a_trailer_after_eoi_is_cut_at_conversion_and_both_backends_keep_the_sample(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    clean = jpeg_bytes(photo(120, 100, 1))
    trailer = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40  # a phone's motion-photo video
    (source / "motion.jpg").write_bytes(clean + trailer)
    (source / "plain.jpg").write_bytes(jpeg_bytes(photo(120, 100, 2)))
    out = tmp_path / "out"
    report = convert_to_shards(source, out, max_size=384, workers=0, progress=False)
    assert report.written == 2 and report.passed_through == 2
    meta, stored = shard_samples(out)["motion.jpg"]
    assert stored == clean  # the image's own bytes, untouched; the trailer is gone
    kept, corrupt = check_shard(str(out / "shard-000000.tar"), str(out / "shard-000000.idx"))
    assert corrupt == [] and len(kept) == 2
    loader = loaders.build_loader(out, backend="torch", device="cpu", batch_size=2, crop_size=32,
                                  mode="eval", num_workers=0)
    assert sorted(key for batch in loader for key in batch.keys) == sorted(
        [input_key("motion.jpg"), input_key("plain.jpg")])


def test_prepare_image_cuts_the_trailer_of_a_passed_through_jpeg():
    clean = jpeg_bytes(photo(64, 48, 3))
    prepared = prepare_image(clean + b"CAMERA-TRAILER" * 100, HygieneOptions(max_size=384))
    assert isinstance(prepared, Prepared) and prepared.passed_through
    assert prepared.jpeg == clean
    assert prepare_image(clean, HygieneOptions(max_size=384)).jpeg is not None


# ----------------------------------------------------------------------------- names
@needs_undecodable_names
def test_a_name_that_is_not_utf8_is_converted_and_recorded_losslessly(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    good = [f"ok{index}.jpg" for index in range(3)]
    for index, name in enumerate(good):
        (source / name).write_bytes(jpeg_bytes(photo(64, 64, 10 + index)))
    latin1 = b"caf\xe9.jpg"  # a Latin-1 name from an old camera or a zip
    (source / os.fsdecode(latin1)).write_bytes(jpeg_bytes(photo(64, 64, 20)))
    not_an_image = b"notes-\xff\xfe.jpg"
    (source / os.fsdecode(not_an_image)).write_bytes(b"not an image at all")
    out = tmp_path / "out"
    report = convert_to_shards(source, out, workers=0, progress=False)
    assert (report.inputs, report.written, report.skipped) == (5, 4, 1)
    written = shard_samples(out)
    assert {os.fsencode(name) for name in written} == {name.encode() for name in good} | {latin1}
    meta, _ = written[os.fsdecode(latin1)]
    assert meta["key"] == input_key(os.fsdecode(latin1))
    assert input_key("ok0.jpg") == input_key(os.fsdecode(b"ok0.jpg"))  # valid names keep their keys
    (skipped,) = list(iter_skipped(out))
    assert os.fsencode(skipped["source"]) == not_an_image and skipped["reason"] == "not an image"
    for path in [*out.glob("*.json"), *out.glob("*.jsonl")]:
        path.read_bytes().decode("utf-8")  # every report stays valid UTF-8
    resumed = convert_to_shards(source, out, workers=0, progress=False)
    assert resumed.already_complete and resumed.written == 4


# ----------------------------------------------------------------------------- too little data
def declared_bigger(width: int, height: int) -> bytes:
    """A small valid JPEG whose frame header is rewritten to declare ``width`` x ``height``."""
    data = bytearray(jpeg_bytes(photo(96, 96, 4)))
    frame = data.find(b"\xff\xc0")
    data[frame + 5:frame + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_a_3kb_jpeg_that_declares_9000x9000_is_skipped_as_corrupt(tmp_path):
    bomb = declared_bigger(9000, 9000)
    assert len(bomb) < 6000
    rejected = prepare_image(bomb, HygieneOptions(max_size=384))
    assert isinstance(rejected, Rejected) and rejected.reason == "corrupt image"
    assert "too little data" in rejected.detail and "9000x9000" in rejected.detail
    source = tmp_path / "in"
    source.mkdir()
    (source / "bomb.jpg").write_bytes(bomb)
    (source / "fine.jpg").write_bytes(jpeg_bytes(photo(400, 300, 5)))
    report = convert_to_shards(source, tmp_path / "out", workers=0, progress=False)
    assert (report.written, report.skipped) == (1, 1)
    (record,) = list(iter_skipped(tmp_path / "out"))
    assert record["source"] == "bomb.jpg" and record["reason"] == "corrupt image"
    assert "too little data" in record["detail"]


def test_flat_and_tiny_images_are_not_too_little_data():
    options = HygieneOptions(max_size=384, min_size=1)
    for image in (Image.new("RGB", (3000, 2000), (200, 200, 200)), Image.new("L", (1024, 1024), 0),
                  photo(1, 1, 6), photo(7, 9, 7)):
        stream = io.BytesIO()
        image.save(stream, "JPEG", quality=5, optimize=True)
        assert isinstance(prepare_image(stream.getvalue(), options), Prepared), image.size


# ----------------------------------------------------------------------------- one reader
@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory) -> Path:
    """Files whose names and contents disagree, transparency, EXIF rotation, CMYK."""
    root = tmp_path_factory.mktemp("folder")
    transparent = Image.new("RGBA", (80, 80), (0, 0, 0, 0))  # fully transparent: white, not black
    transparent.save(root / "transparent.png")
    rotated = photo(120, 60, 8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees, 60 x 120
    rotated.save(root / "rotated.jpg", "JPEG", quality=90, exif=exif)
    photo(64, 64, 9).convert("CMYK").save(root / "cmyk.jpg", "JPEG", quality=90)
    photo(64, 64, 10).save(root / "really-a-png.jpg", "PNG")
    photo(64, 64, 11).save(root / "no-extension", "JPEG")
    Image.new("P", (64, 64), 3).save(root / "palette.gif")
    (root / "notes.jpg").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(jpeg_bytes(photo(64, 64, 12)))
    return root


def test_list_image_files_chooses_by_content(hostile_folder):
    names = [path.name for path in list_image_files(hostile_folder)]
    assert names == sorted(["cmyk.jpg", "no-extension", "palette.gif", "really-a-png.jpg", "rotated.jpg",
                            "transparent.png"])


def test_read_image_applies_the_conversions_hygiene(hostile_folder):
    white = np.asarray(read_image((hostile_folder / "transparent.png").read_bytes()))
    assert white.shape == (80, 80, 3) and white.min() == 255
    assert read_image((hostile_folder / "rotated.jpg").read_bytes()).size == (60, 120)
    assert read_image((hostile_folder / "cmyk.jpg").read_bytes()).mode == "RGB"
    with pytest.raises(ValueError, match="not an image"):
        read_image((hostile_folder / "notes.jpg").read_bytes())
    big = photo(800, 600, 13)
    assert min(read_image(jpeg_bytes(big), min_side=200).size) >= 200  # DCT scaling, never below


def test_folder_and_shards_are_read_alike(hostile_folder, tmp_path):
    """preview --images, embed on a folder and the shards see the same pixels."""
    from ecomaug.evaluation.embed import count_samples, iter_folder_samples, prepare
    from ecomaug.preview import images_from_folder

    out = tmp_path / "shards"
    convert_to_shards(hostile_folder, out, workers=0, progress=False, max_size=384, min_size=8)
    written = shard_samples(out)
    assert set(written) == {"cmyk.jpg", "no-extension", "palette.gif", "really-a-png.jpg", "rotated.jpg",
                            "transparent.png"}
    assert [name for name, _, _ in iter_folder_samples(hostile_folder)] == sorted(written)
    assert count_samples(hostile_folder) == len(written)
    for name, (_, jpeg) in written.items():
        from_folder = prepare((hostile_folder / name).read_bytes(), 48).float()
        from_shard = prepare(jpeg, 48).float()
        assert (from_folder - from_shard).abs().mean() < 4, name  # JPEG noise, not black tiles
    tiles = images_from_folder(hostile_folder, 6, size=32, seed=0)
    assert tiles.shape == (6, 3, 32, 32)
    assert int(tiles.float().mean(dim=(1, 2, 3)).max()) == 255  # the transparent PNG is white


# ----------------------------------------------------------------------------- conversion internals
def test_the_conversion_resizes_like_pillows_bicubic():
    source = photo(800, 800, 14)
    prepared = prepare_image(jpeg_bytes(source, subsampling=0), HygieneOptions(max_size=512, quality=100))
    assert isinstance(prepared, Prepared) and (prepared.width, prepared.height) == (512, 512)
    decoded = np.asarray(Image.open(io.BytesIO(prepared.jpeg)), np.float32)
    reference = np.asarray(read_image(jpeg_bytes(source, subsampling=0)).resize(
        (512, 512), Image.Resampling.BICUBIC), np.float32)
    assert np.abs(decoded - reference).mean() < 1.0


def test_shards_are_byte_for_byte_what_webdataset_writes(tmp_path):
    import webdataset

    source = tmp_path / "in"
    source.mkdir()
    for index in range(3):
        (source / f"{index}.jpg").write_bytes(jpeg_bytes(photo(50, 40, index)))
    out = tmp_path / "out"
    convert_to_shards(source, out, workers=0, progress=False)
    ours = (out / "shard-000000.tar").read_bytes()
    stream = io.BytesIO()
    with tarfile.open(out / "shard-000000.tar") as archive:
        members = [(member.name, archive.extractfile(member).read()) for member in archive]
    writer = webdataset.TarWriter(stream, encoder=False, mtime=0)
    for (jpg_name, jpg), (_, meta) in zip(members[::2], members[1::2]):
        writer.write({"__key__": jpg_name.split(".")[0], "jpg": jpg, "json": meta})
    writer.close()
    assert ours == stream.getvalue()


def _photo_folder(folder: Path, count: int) -> Path:
    folder.mkdir()
    for index in range(count):
        (folder / f"{index}.jpg").write_bytes(jpeg_bytes(photo(200, 150, index)))
    return folder


def test_the_shard_command_imports_torch_only_to_start_its_workers(tmp_path):
    """``import loaders.convert`` and ``ecomaug shard --help`` import no torch; a conversion imports
    it once, in the parent, just before its workers fork (they share it), and not at all when
    it runs in-process without a resize."""
    source = _photo_folder(tmp_path / "in", 4)
    script = (f"import sys; from loaders.convert import convert_to_shards; print('torch' in sys.modules); "
              f"r = convert_to_shards({str(source)!r}, {str(tmp_path / 'a')!r}, workers=0, max_size=300, "
              f"progress=False); print('torch' in sys.modules, r.passed_through); "
              f"r = convert_to_shards({str(source)!r}, {str(tmp_path / 'b')!r}, workers=2, max_size=100, "
              f"progress=False); print('torch' in sys.modules, r.written)")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=root)
    assert result.stdout.split() == ["False", "False", "4", "True", "4"]
    script = "import sys; from ecomaug.cli import main; sys.argv = ['ecomaug', 'shard', '--help']\n" \
             "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=root)
    assert result.stdout.strip().endswith("False")


def test_workers_die_on_terminate_whatever_sigterm_handler_the_parent_has(tmp_path):
    """train.py notes SIGTERM to stop at a step boundary; forked workers must not inherit that,
    or Pool.terminate() cannot end them and the conversion hangs in its join."""
    source = _photo_folder(tmp_path / "in", 3)
    script = (f"import signal; signal.signal(signal.SIGTERM, lambda *_: None)\n"
              f"from loaders.convert import convert_to_shards\n"
              f"r = convert_to_shards({str(source)!r}, {str(tmp_path / 'out')!r}, workers=2, max_size=100, "
              f"progress=False)\nprint(r.written)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and result.stdout.strip() == "3", result.stderr
