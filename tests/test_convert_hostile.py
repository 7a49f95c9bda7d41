"""A folder of hostile inputs: every input ends up written or skipped with the right reason."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from loaders.convert import convert_to_shards
from loaders.convert.inputs import input_key
from loaders.manifest import iter_skipped


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random RGB picture (JPEG-friendly, distinct per seed)."""
    generator = np.random.default_rng(seed)
    small = generator.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def _save(image: Image.Image, path: Path, format: str, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format, **kwargs)


def _hostile_folder(root: Path) -> dict[str, str | None]:
    """Write the hostile inputs; return {relative path: expected skip reason or None if written}."""
    expected: dict[str, str | None] = {}
    buffer = io.BytesIO()
    _photo(160, 120, 1).save(buffer, "JPEG", quality=90)
    (root / "bad").mkdir(parents=True)
    (root / "bad" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    expected["bad/truncated.jpg"] = "corrupt image"
    (root / "bad" / "empty.jpg").write_bytes(b"")
    expected["bad/empty.jpg"] = "empty file"
    (root / "bad" / "notes.jpg").write_text("this is not a picture\n")
    expected["bad/notes.jpg"] = "not an image"
    _save(_photo(1, 1, 2), root / "bad" / "one-pixel.png", "PNG")
    expected["bad/one-pixel.png"] = "too small"
    _save(_photo(500, 400, 3), root / "bad" / "huge.png", "PNG")  # over the test's 150k pixel limit
    expected["bad/huge.png"] = "too many pixels"

    _save(_photo(120, 90, 4).convert("CMYK"), root / "modes" / "cmyk.jpg", "JPEG", quality=95)
    expected["modes/cmyk.jpg"] = None
    ramp = (np.linspace(0, 65535, 100 * 80).reshape(80, 100)).astype(np.uint16)
    ramp[:, :10] = 30000  # Pillow's plain convert would clip this to 255; scaled it is ~117
    _save(Image.fromarray(ramp), root / "modes" / "gray16.png", "PNG")
    expected["modes/gray16.png"] = None
    palette = _photo(100, 80, 5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_pixels = np.array(palette)
    palette_pixels[:20, :20] = 15
    palette = Image.fromarray(palette_pixels).convert("P")
    palette.putpalette(_photo(100, 80, 5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).getpalette())
    _save(palette, root / "modes" / "palette-transparent.png", "PNG", transparency=15)
    expected["modes/palette-transparent.png"] = None
    rgba = _photo(100, 80, 6).convert("RGBA")
    alpha = np.full((80, 100), 255, np.uint8)
    alpha[:20, :20] = 0
    rgba.putalpha(Image.fromarray(alpha))
    _save(rgba, root / "modes" / "rgba.png", "PNG")
    expected["modes/rgba.png"] = None
    frames = [Image.new("RGB", (90, 70), color) for color in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    frames[0].save(root / "modes" / "animated.gif", "GIF", save_all=True, append_images=frames[1:], duration=50)
    expected["modes/animated.gif"] = None
    _save(_photo(100, 80, 7).convert("L"), root / "modes" / "gray.jpg", "JPEG")
    expected["modes/gray.jpg"] = None
    _save(_photo(100, 80, 8), root / "modes" / "named-wrong.png", "JPEG")  # a JPEG called .png
    expected["modes/named-wrong.png"] = None

    _save(_photo(140, 100, 9), root / "dup" / "a-original.jpg", "JPEG", quality=90)
    shutil.copy(root / "dup" / "a-original.jpg", root / "dup" / "b-same-bytes.jpg")
    expected["dup/a-original.jpg"] = None
    expected["dup/b-same-bytes.jpg"] = "duplicate bytes"
    picture = _photo(110, 90, 10)
    _save(picture, root / "dup" / "c-pixels.png", "PNG", compress_level=1)
    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "same pixels, different bytes")
    _save(picture, root / "dup" / "d-same-pixels.png", "PNG", compress_level=9, pnginfo=text)
    expected["dup/c-pixels.png"] = None
    expected["dup/d-same-pixels.png"] = "duplicate pixels"
    return expected


def _written(out: Path) -> dict[str, tuple[dict, Image.Image]]:
    samples = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                image = Image.open(io.BytesIO(members[f"{meta['key']}.jpg"]))
                image.load()
                samples[meta["source"]] = (meta, image)
    return samples


def test_hostile_inputs_are_written_or_skipped_with_reasons(tmp_path):
    expected = _hostile_folder(tmp_path / "in")
    out = tmp_path / "out"
    report = convert_to_shards(tmp_path / "in", out, shard_size=4, workers=2, progress=False,
                               max_pixels=150_000, min_size=16)

    assert report.inputs == len(expected) == report.written + report.skipped
    skipped = {record["source"]: record for record in iter_skipped(out)}
    written = _written(out)
    assert set(written) | set(skipped) == set(expected) and not set(written) & set(skipped)
    for source, reason in expected.items():
        if reason is None:
            assert source in written, f"{source} was skipped: {skipped.get(source)}"
        else:
            assert skipped[source]["reason"] == reason, skipped[source]
            assert skipped[source]["key"] == input_key(source)
    assert skipped["dup/b-same-bytes.jpg"]["duplicate_of"] == input_key("dup/a-original.jpg")
    assert skipped["dup/d-same-pixels.png"]["duplicate_of"] == input_key("dup/c-pixels.png")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["skipped_by_reason"] == {
        reason: list(expected.values()).count(reason) for reason in set(expected.values()) if reason}

    for source, (meta, image) in written.items():
        assert image.format == "JPEG" and image.mode == "RGB", source
        assert not image.info.get("progressive"), source
        assert (meta["width"], meta["height"]) == image.size
    # 16-bit is scaled, not clipped: the 30000 stripe becomes ~117, the ramp ends near 255.
    gray16 = np.asarray(written["modes/gray16.png"][1]).astype(int)
    assert abs(gray16[40, 4].mean() - 117) < 8 and gray16[79, 99].mean() > 240
    # Transparency is composited on white; the animation keeps its first (red) frame.
    assert np.asarray(written["modes/rgba.png"][1])[5:15, 5:15].min() > 240
    assert np.asarray(written["modes/palette-transparent.png"][1])[5:15, 5:15].min() > 240
    red = np.asarray(written["modes/animated.gif"][1]).reshape(-1, 3).mean(axis=0)
    assert red[0] > 170 and red[1] < 70 and red[2] < 70
    # CMYK comes out as the same picture in RGB, not as inverted or garbled colours.
    cmyk_reference = np.asarray(_photo(120, 90, 4).convert("CMYK").convert("RGB")).astype(int)
    assert np.abs(np.asarray(written["modes/cmyk.jpg"][1]).astype(int) - cmyk_reference).mean() < 12


@pytest.mark.parametrize("workers", [0, 1])
def test_hostile_inputs_same_result_in_process_and_in_workers(tmp_path, workers):
    expected = _hostile_folder(tmp_path / "in")
    report = convert_to_shards(tmp_path / "in", tmp_path / "out", shard_size=64, workers=workers,
                               progress=False, max_pixels=150_000, min_size=16)
    assert report.written == sum(reason is None for reason in expected.values())
    assert report.skipped == sum(reason is not None for reason in expected.values())
