"""The JPEG structure parser behind the DALI shard check: valid files pass, damaged ones are named."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import loaders

from loaders.build import dali_available
from loaders.convert.jpeg_structure import RESERVED, TRUNCATED, JpegStructureError, jpeg_layout, too_little_data
from loaders.shard_check import check_shard, jpeg_problem  # the DALI backend's check


def photo_jpeg(width: int, height: int, quality: int, seed: int, **save) -> bytes:
    """A smooth colour field plus noise, the statistics of a product photo."""
    generator = np.random.default_rng(seed)
    coarse = generator.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16)
    pixels = np.clip(base + generator.integers(-20, 21, (height, width, 1)), 0, 255).astype(np.uint8)
    stream = io.BytesIO()
    Image.fromarray(pixels).save(stream, "JPEG", quality=quality, **save)
    return stream.getvalue()


def test_every_width_from_1_to_1024_passes():
    # a width of 255, 511, 767 or 1023 puts FF 03 (width low byte, component count) in the frame
    # header, which a byte scan of the whole file took for a reserved marker
    flagged = {width: problem for width in range(1, 1025)
               if (problem := jpeg_problem(photo_jpeg(width, 16, 85, width))) is not None}
    assert flagged == {}


def test_every_height_from_1_to_1024_passes():
    flagged = [height for height in range(1, 1025) if jpeg_problem(photo_jpeg(16, height, 85, height))]
    assert flagged == []


@pytest.mark.parametrize("quality", range(5, 101))
def test_every_quality_passes(quality):
    # low qualities put quantisation steps of 255 (FF) into the DQT segment
    for seed in range(4):
        data = photo_jpeg(160, 120, quality, 1000 * quality + seed)
        assert jpeg_problem(data) is None, (quality, seed)
        Image.open(io.BytesIO(data)).load()  # and it really is a decodable file


@pytest.mark.parametrize("save", [{}, {"progressive": True}, {"subsampling": 0}, {"optimize": True}])
def test_the_layout_finds_the_frame_and_the_end(save):
    data = photo_jpeg(255, 120, 80, 3, **save)
    layout = jpeg_layout(data + b"trailer bytes \xff\xd8\xff\xe1 of a motion photo")
    assert (layout.frame.width, layout.frame.height) == (255, 120)
    assert layout.end == len(data) and data[layout.end - 2:layout.end] == b"\xff\xd9"
    assert layout.frame.progressive == bool(save.get("progressive"))
    assert (layout.scans > 1) == bool(save.get("progressive"))
    assert 0 < layout.entropy_bytes < len(data)


def test_restart_markers_and_fill_bytes_are_part_of_a_scan():
    data = photo_jpeg(200, 200, 90, 4)
    pixels = np.asarray(Image.open(io.BytesIO(data)))
    stream = io.BytesIO()
    Image.fromarray(pixels).save(stream, "JPEG", quality=90, restart_marker_blocks=2)
    with_restarts = stream.getvalue()
    assert any(bytes([0xFF, code]) in with_restarts for code in range(0xD0, 0xD8))
    assert jpeg_problem(with_restarts) is None
    filled = with_restarts[:-2] + b"\xff\xff\xff" + with_restarts[-2:]  # fill bytes before EOI
    assert jpeg_problem(filled) is None


def test_damage_is_still_found():
    good = photo_jpeg(120, 90, 85, 5)
    layout = jpeg_layout(good)
    scan_middle = layout.end - layout.entropy_bytes // 2
    frame = good.find(b"\xff\xc0")
    zero_height = bytearray(good)
    zero_height[frame + 5:frame + 7] = b"\0\0"
    cases = {
        "truncated": (good[:scan_middle], TRUNCATED),
        "cut in the header": (good[:frame + 6], TRUNCATED),
        "reserved marker in the scan": (good[:scan_middle] + b"\xff\x05" + good[scan_middle + 2:], RESERVED),
        "JPGn marker in the scan": (good[:scan_middle] + b"\xff\xf3" + good[scan_middle + 2:], RESERVED),
        "zero height": (bytes(zero_height), "frame size 120x0"),
        "no SOI": (b"GIF89a" + good, "not a JPEG"),
        "second SOI": (good[:2] + good, "second SOI"),
        "no scan": (good[:good.find(b"\xff\xda")] + b"\xff\xd9", "no image data"),
    }
    for name, (data, expected) in cases.items():
        problem = jpeg_problem(data)
        assert problem is not None and expected in problem, name
        with pytest.raises(JpegStructureError):
            jpeg_layout(data)


def test_zero_padding_and_trailers_after_the_eoi_are_allowed():
    good = photo_jpeg(64, 64, 85, 6)
    assert jpeg_problem(good + b"\0" * 100) is None
    assert jpeg_problem(good + photo_jpeg(32, 32, 50, 7)) is None  # a second image (MPO-like)
    assert jpeg_problem(good + b"ftypmp42" + bytes(range(256)) * 8) is None  # a motion photo's video


def test_too_little_data_is_a_lower_bound_valid_files_never_meet():
    flat = io.BytesIO()
    Image.new("RGB", (2000, 2000), (128, 128, 128)).save(flat, "JPEG", quality=50, optimize=True)
    layout = jpeg_layout(flat.getvalue())
    assert too_little_data(layout.frame, layout.entropy_bytes) is None  # the flattest image there is
    # the same header declaring 9000x9000: far too little data for it
    big = bytearray(flat.getvalue())
    frame = big.find(b"\xff\xc0")
    big[frame + 5:frame + 9] = (9000).to_bytes(2, "big") * 2
    layout = jpeg_layout(bytes(big))
    reason = too_little_data(layout.frame, layout.entropy_bytes)
    assert reason is not None and "9000x9000" in reason


def test_the_shard_check_keeps_odd_widths_low_qualities_and_trailers(tmp_path):
    from test_loaders_corrupt import write_shards

    samples = [(f"w{width}", photo_jpeg(width, 40, 85, width)) for width in (255, 511, 767, 1023)]
    samples += [(f"q{quality}", photo_jpeg(160, 120, quality, 1000 * quality)) for quality in (5, 7, 10)]
    samples.append(("trailer", photo_jpeg(64, 64, 85, 1) + b"MotionPhoto_Data" + bytes(4096)))
    samples.append(("cut", photo_jpeg(64, 64, 85, 2)[:300]))
    shards = write_shards(tmp_path, [samples])
    kept, corrupt = check_shard(str(shards / "shard-000000.tar"), str(shards / "shard-000000.idx"))
    assert corrupt == [("cut", TRUNCATED)]
    assert len(kept) == len(samples) - 1


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_available(), reason="NVIDIA DALI is not installed"))])
def test_both_backends_yield_the_same_samples_from_odd_but_valid_jpegs(tmp_path, backend):
    from test_loaders_corrupt import write_shards

    samples = [("w255", photo_jpeg(255, 40, 85, 1)), ("q7", photo_jpeg(96, 80, 7, 2)),
               ("trailer", photo_jpeg(96, 80, 85, 3) + b"ftypmp42" + bytes(range(256)) * 16),
               ("plain", photo_jpeg(96, 80, 85, 4))]
    bad = bytearray(photo_jpeg(96, 80, 85, 5))
    frame = bad.find(b"\xff\xc0")
    bad[frame + 5:frame + 7] = b"\0\0"  # zero height: the check finds it, Pillow fails on it
    samples.append(("zero-height", bytes(bad)))
    shards = write_shards(tmp_path, [samples])
    loader = loaders.build_loader(shards, backend=backend, device="cpu", batch_size=2, crop_size=32,
                                  mode="eval", num_workers=0 if backend == "torch" else 1)
    keys = sorted(key for batch in loader for key in batch.keys)
    assert keys == ["plain", "q7", "trailer", "w255"]
    assert loader.corrupt_count == 1
