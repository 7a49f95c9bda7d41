"""Hostile sample members and index/manifest mistakes: both loaders agree, or refuse in one line.

Every case is read by the PyTorch loader and by DALI's CPU pipeline (``device_id=None``) where DALI
is installed, and each must give the outcome written in the test: the same keys, the same
``(shard, key, reason)`` of every sample left out, or the same one-line ValueError naming the file.
The shards are tiny and built here (webdataset's TarWriter + DALI's wds2idx).
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import loaders
from loaders import dali_index, shard_check
from loaders.build import dali_available
from loaders.manifest import write_json_atomic

WDS2IDX = Path(sys.executable).with_name("wds2idx")
BACKENDS = ["torch"] + (["dali"] if dali_available() else [])
SIZE = 6  # samples per shard
BAD = "s0k03"  # the sample each case spoils


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    stream = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).resize((48, 40)).save(stream, "JPEG")
    return stream.getvalue()


def make_shards(out: Path, *, shards: int = 2, json_of=None, repeat: str | None = None) -> Path:
    """``shards`` shards of :data:`SIZE` samples with wds2idx indexes and a manifest.

    ``json_of(key)`` gives a sample's ``.json`` bytes (None: no ``.json`` member); ``repeat``
    writes that key a second time right after itself (its copy's json has ``"copy": 2``)."""
    import webdataset

    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for number in range(shards):
        tar = out / f"shard-{number:06d}.tar"
        with webdataset.TarWriter(str(tar)) as writer:
            for index in range(SIZE):
                key = f"s{number}k{index:02d}"
                data = json_of(key) if json_of else json.dumps({"key": key}).encode()
                writer.write({"__key__": key, "jpg": jpeg(number * 100 + index),
                              **({"json": data} if data is not None else {})})
                if key == repeat:
                    writer.write({"__key__": key, "jpg": jpeg(999), "json": b'{"copy": 2}'})
        subprocess.run([str(WDS2IDX), str(tar), str(tar.with_suffix(".idx"))], check=True, capture_output=True)
        entries.append({"tar": tar.name, "index": tar.with_suffix(".idx").name, "count": SIZE})
    write_json_atomic(out / "manifest.json", {"format": "ecomaug-shards", "format_version": 1,
                                              "shards": entries})
    return out


def read(data, backend: str, **options):
    """``(sorted keys, metadata by key, sorted (shard name, key, reason))`` or the error's text."""
    settings = dict(backend=backend, device="cpu", batch_size=4, crop_size=16, mode="eval",
                    num_workers=0 if backend == "torch" else 1)
    settings.update(options)
    try:
        loader = loaders.build_loader(data, **settings)
        batches = list(loader)
    except ValueError as error:
        return f"ValueError: {error}"
    keys = [key for batch in batches for key in batch.keys]
    metas = {meta["key"]: meta for batch in batches for meta in batch.meta}
    left_out = sorted((Path(shard).name, key, reason) for shard, key, reason in loader.corrupt)
    assert loader.corrupt_count == len(left_out)
    return sorted(keys), metas, left_out


def every_key(shards: int = 2) -> list[str]:
    return [f"s{number}k{index:02d}" for number in range(shards) for index in range(SIZE)]


# ----------------------------------------------------------------------------- item 5: .json members
def test_a_sample_without_json_is_read_by_both_loaders_in_training_and_eval(tmp_path):
    shards = make_shards(tmp_path, json_of=lambda key: None if key == BAD else json.dumps({"key": key}).encode())
    for backend in BACKENDS:
        keys, metas, left_out = read(shards, backend)
        assert (keys, left_out) == (every_key(), []), backend
        assert metas[BAD] == {"key": BAD}, backend
        loader = loaders.build_loader(shards, backend=backend, device="cpu", batch_size=4, crop_size=16,
                                      num_workers=0 if backend == "torch" else 1)
        assert sum(len(batch.keys) for batch in loader) == 12 and loader.corrupt_count == 0, backend


BAD_JSON = {
    "list": (b"[1, 2]", "s0k03.json is not a JSON object (it is an array)"),
    "string": (b'"a caption"', "s0k03.json is not a JSON object (it is a string)"),
    "invalid": (b'{"key": ', "s0k03.json is not valid JSON (Expecting value at line 1 column 9)"),
    "not-utf8": (b'{"title": "caf\xe9"}', "s0k03.json is not UTF-8 text (invalid continuation byte at byte 14)"),
    "deep": (b"[" * 100_000 + b"]" * 100_000, "s0k03.json nests deeper than 64 levels"),
    "deep-object": (b'{"a": ' * 200 + b"1" + b"}" * 200, "s0k03.json nests deeper than 64 levels"),
}


@pytest.mark.parametrize("kind", sorted(BAD_JSON))
def test_a_bad_json_is_skipped_and_counted_with_the_same_reason_by_both(tmp_path, kind):
    data, reason = BAD_JSON[kind]
    shards = make_shards(tmp_path, json_of=lambda key: data if key == BAD else json.dumps({"key": key}).encode())
    for backend in BACKENDS:
        keys, _, left_out = read(shards, backend)
        assert keys == [key for key in every_key() if key != BAD], backend
        assert left_out == [("shard-000000.tar", BAD, reason)], backend
        # in training too: counted with its reason (the PyTorch backend puts a stand-in in its place)
        loader = loaders.build_loader(shards, backend=backend, device="cpu", batch_size=4, crop_size=16,
                                      num_workers=0 if backend == "torch" else 1)
        assert BAD not in {key for batch in loader for key in batch.keys}, backend
        assert [entry[1:] for entry in loader.corrupt] == [(BAD, reason)], backend


def test_a_bad_json_with_corrupt_raise_is_the_same_one_line_error_from_both(tmp_path):
    shards = make_shards(tmp_path, json_of=lambda key: b"[]" if key == BAD else b"{}")
    expected = (f"ValueError: corrupt sample {BAD!r} in shard {tmp_path / 'shard-000000.tar'}: "
                f"{BAD}.json is not a JSON object (it is an array)")
    for backend in BACKENDS:
        assert read(shards, backend, corrupt="raise") == expected, backend


# ----------------------------------------------------------------------------- item 6: index and manifest
def index_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def refusal(shards: Path, problem: str, number: int = 0) -> str:
    tar, index = shards / f"shard-{number:06d}.tar", shards / f"shard-{number:06d}.idx"
    return (f"ValueError: {index} does not match its shard {tar}: {problem}; "
            f"rebuild it with `python -m loaders.dali_index {tar} {index}`")


@pytest.mark.parametrize("how", ["first-line", "lines"])
def test_an_index_claiming_5_of_the_tars_samples_is_refused_by_both(tmp_path, how):
    shards = make_shards(tmp_path, shards=1)
    index = shards / "shard-000000.idx"
    lines = index_lines(index)
    kept = lines[1:] if how == "first-line" else lines[1:6]
    index.write_text("\n".join(["v1.2 5", *kept]) + "\n")
    problem = {"first-line": f"its first line says 5 samples but it lists {SIZE}",
               "lines": "the tar holds 2 member(s) after the last one it lists (the first is s0k05.jpg)"}[how]
    for backend in BACKENDS:
        message = read(shards, backend)
        assert message == refusal(shards, problem) and "\n" not in message, backend


def test_an_index_with_a_line_left_out_in_the_middle_is_refused_by_both(tmp_path):
    shards = make_shards(tmp_path, shards=1)
    index = shards / "shard-000000.idx"
    lines = index_lines(index)
    index.write_text("\n".join([f"v1.2 {SIZE - 1}", *lines[1:3], *lines[4:]]) + "\n")
    problem = "the tar's member 5 is s0k02.jpg"
    for backend in BACKENDS:
        message = read(shards, backend)
        assert message.startswith(refusal(shards, problem).split(problem)[0] + problem), (backend, message)


def test_another_shards_index_is_refused_by_both(tmp_path):
    shards = make_shards(tmp_path)
    (shards / "shard-000000.idx").write_bytes((shards / "shard-000001.idx").read_bytes())
    problem = (f"the tar's member 1 is s0k00.jpg ({len(jpeg(0))} bytes at byte 1536) but the index lists "
               f"s1k00.jpg ({len(jpeg(100))} bytes at byte 1536)")
    for backend in BACKENDS:
        assert read(shards, backend) == refusal(shards, problem), backend


@pytest.mark.parametrize("how", ["manifest", "list"])
def test_a_shard_set_listing_a_tar_twice_is_refused_by_both(tmp_path, how):
    shards = make_shards(tmp_path)
    tar = shards / "shard-000000.tar"
    if how == "manifest":
        manifest = json.loads((shards / "manifest.json").read_text())
        manifest["shards"].append(dict(manifest["shards"][0]))
        write_json_atomic(shards / "manifest.json", manifest)
        data, where = shards, shards / "manifest.json"
    else:
        (shards / "alias.tar").symlink_to(tar.name)  # the same file under another name
        data, where = [str(tar), str(shards / "shard-000001.tar"), str(shards / "alias.tar")], "the shard list"
    expected = f"ValueError: {where} lists the shard {tar if how == 'manifest' else data[2]} twice"
    for backend in BACKENDS:
        message = read(data, backend)
        assert message.startswith(expected) and "\n" not in message, (backend, message)


def test_a_key_repeated_right_after_itself_keeps_the_first_copy_in_both(tmp_path):
    shards = make_shards(tmp_path, repeat=BAD)
    reason = f"its key is written twice in a row; the first copy is read, the repeat ({BAD}.jpg, {BAD}.json) is not"
    for backend in BACKENDS:
        keys, metas, left_out = read(shards, backend)
        assert keys == every_key() and "copy" not in metas[BAD], backend
        assert left_out == [("shard-000000.tar", BAD, reason)], backend
        loader = loaders.build_loader(shards, backend=backend, device="cpu", batch_size=4, crop_size=16,
                                      num_workers=0 if backend == "torch" else 1)
        assert sum(len(batch.keys) for batch in loader) == 12 and loader.corrupt_count == 1, backend


# ----------------------------------------------------------------------------- index vs tar: names, headers, cost
def tar_shards(out: Path, keys: list[str], *, tar_format: int = tarfile.PAX_FORMAT, count: int | None = None,
               env: dict[str, str] | None = None) -> Path:
    """One shard of ``keys`` (``.jpg`` + ``.json``) written by tarfile, its wds2idx index (run
    with ``env``) and a manifest saying ``count`` samples (default: right)."""
    out.mkdir(parents=True)
    tar = out / "shard-000000.tar"
    with tarfile.open(tar, "w", format=tar_format) as archive:
        for number, key in enumerate(keys):
            for ext, data in (("jpg", jpeg(number)), ("json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    subprocess.run([str(WDS2IDX), str(tar), str(tar.with_suffix(".idx"))], check=True, capture_output=True, env=env)
    write_json_atomic(out / "manifest.json", {"format": "ecomaug-shards", "format_version": 1, "shards": [
        {"tar": tar.name, "index": "shard-000000.idx", "count": len(keys) if count is None else count}]})
    return out


def test_an_index_written_under_the_c_locale_with_a_non_ascii_name_is_accepted(tmp_path):
    keys = ["s0k00", "café", "s0k02"]
    shards = tar_shards(tmp_path / "shards", keys, env={**os.environ, "LC_ALL": "C", "LANG": "C"})
    assert "caf\\303\\251.jpg" in (shards / "shard-000000.idx").read_text()  # GNU tar's quoting
    assert dali_index.check_index(shards / "shard-000000.tar", shards / "shard-000000.idx") == 3
    for backend in BACKENDS:
        assert read(shards, backend)[::2] == (sorted(keys), []), backend


@pytest.mark.parametrize("count", [3, 2])  # the manifest agrees; it does not (the index is then read whole)
def test_a_key_with_a_space_is_read_by_torch_and_refused_in_one_line_by_dali(tmp_path, caplog, count):
    keys = ["s0k00", "a b", "s0k02"]
    shards = tar_shards(tmp_path / "shards", keys, count=count)
    index = shards / "shard-000000.idx"
    assert "a b.jpg" in index.read_text()
    with caplog.at_level(logging.WARNING, logger="loaders"):
        assert read(shards, "torch")[::2] == (sorted(keys), [])
        assert [shard.count for shard in loaders.load_shard_set(shards).shards] == [3]
    warned = [r for r in caplog.records if "counting its shard from the tar" in r.getMessage()]
    assert len(warned) == (count != 3)  # once, and only where the whole index had to be read
    if "dali" in BACKENDS:
        message = read(shards, "dali")
        assert message.startswith(f"ValueError: {index}: line 3 is not a DALI index line") and "\n" not in message


def test_a_gnu_long_name_tar_is_refused_naming_a_writer_that_fixes_its_index(tmp_path):
    keys = ["k" * 120, "s0k01"]
    shards = tar_shards(tmp_path / "shards", keys, tar_format=tarfile.GNU_FORMAT)
    tar, index = shards / "shard-000000.tar", shards / "shard-000000.idx"
    advice = f"rebuild it with `python -m loaders.dali_index {tar} {index}`"
    for backend in BACKENDS:  # wds2idx took each long name's block for the member's data
        message = read(shards, backend)
        assert message.startswith(f"ValueError: {index} does not match its shard {tar}: the tar's member 1 is ")
        assert message.endswith(advice) and "\n" not in message, backend
    assert dali_index.main([str(tar), str(index)]) == 0
    for backend in BACKENDS:
        assert read(shards, backend)[::2] == (sorted(keys), []), backend


def test_the_index_writer_writes_what_wds2idx_writes(tmp_path):
    shards = make_shards(tmp_path / "shards", shards=1, repeat=BAD)
    tar = shards / "shard-000000.tar"
    assert dali_index.main([str(tar), str(tmp_path / "ours.idx")]) == 0
    assert (tmp_path / "ours.idx").read_bytes() == tar.with_suffix(".idx").read_bytes()
    assert dali_index.main([str(tmp_path / "missing.tar")]) == 2


def tar_header(kind: bytes, size: int, name: bytes = b"././@PaxHeader") -> bytes:
    header = bytearray(512)
    header[:len(name)], header[100:108], header[156:157] = name, b"0000644\0", kind
    header[124:136] = b"%012o" % size  # 12 octal digits: up to 64 GiB
    header[257:265], header[148:156] = b"ustar\x0000", b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


class RecordingStream(io.BytesIO):
    largest = 0

    def read(self, size=-1):
        self.largest = max(self.largest, size)
        return super().read(size)


def hostile_shards(out: Path, prefix: bytes) -> Path:
    """A shard of 3 good samples behind ``prefix`` (a hostile header), with no index."""
    make_shards(out, shards=1)
    tar = out / "shard-000000.tar"
    tar.write_bytes(prefix + tar.read_bytes())
    (out / "shard-000000.idx").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["shards"][0]["index"]
    write_json_atomic(out / "manifest.json", manifest)
    return out


@pytest.mark.parametrize("kind", [b"x", b"g", b"L", b"K"])
def test_a_huge_pax_or_long_name_header_is_a_broken_tar_not_a_huge_allocation(tmp_path, kind):
    prefix = tar_header(kind, 8 << 30) + b"path" * 128  # claims 8 GiB, holds 512 bytes
    stream = RecordingStream(prefix + bytes(1024))
    assert dali_index.tar_members(stream) == ([], "broken")
    assert stream.largest <= dali_index.MAX_HEADER_DATA
    shards = hostile_shards(tmp_path / "shards", prefix)
    assert shard_check.count_samples(shards / "shard-000000.tar") is None  # the loader meets the break
    assert [shard.count for shard in loaders.load_shard_set(shards).shards] == [SIZE]  # the manifest's


GARBAGE_PAX = [b"ab path=x.jpg\n", b"99 path=x.jpg\n", b"3 path=x.jpg\n", b"14 path=x.jpgX", b"12 size=1e3\n"]


@pytest.mark.parametrize("payload", GARBAGE_PAX)
def test_a_garbage_pax_record_is_a_broken_tar_never_a_bare_value_error(tmp_path, payload):
    prefix = tar_header(b"x", len(payload)) + payload.ljust(512, b"\0")
    assert dali_index.tar_members(io.BytesIO(prefix + bytes(1024))) == ([], "broken")
    shards = hostile_shards(tmp_path / "shards", prefix)
    tar = shards / "shard-000000.tar"
    assert shard_check.count_samples(tar) is None
    assert [shard.count for shard in loaders.load_shard_set(shards).shards] == [SIZE]
    (shards / "other.idx").write_text("v1.2 1\njpg 1536 10 s0k00.jpg\n")
    try:
        dali_index.check_index(tar, shards / "other.idx")
    except ValueError as error:
        assert str(shards / "other.idx") in str(error)


def test_loading_a_shard_set_whose_manifest_and_indexes_agree_does_not_scan_the_tars(tmp_path, monkeypatch):
    shards = make_shards(tmp_path / "shards")
    calls = []

    def counting(stream, start=0, limit=None):
        members, ending = real(stream, start, limit)
        calls.append((start, limit, len(members)))
        return members, ending

    real = dali_index.tar_members
    monkeypatch.setattr(dali_index, "tar_members", counting)
    monkeypatch.setattr(shard_check, "tar_members", counting)
    assert [shard.count for shard in loaders.load_shard_set(shards).shards] == [SIZE, SIZE]
    # per shard: the header of its first member, then its last sample's two members to the end
    assert sorted((limit or 0, found) for _, limit, found in calls) == [(0, 2), (0, 2), (1, 1), (1, 1)], calls
    calls.clear()  # a manifest count that disagrees: that shard alone is read whole (and keeps the tar's)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][1]["count"] = SIZE - 1
    write_json_atomic(shards / "manifest.json", manifest)
    assert [shard.count for shard in loaders.load_shard_set(shards).shards] == [SIZE, SIZE]
    assert sorted(found for _, limit, found in calls if limit is None) == [2, 2 * SIZE], calls


def test_an_index_claiming_5_of_its_6_lines_is_refused_by_both_without_a_manifest(tmp_path):
    shards = make_shards(tmp_path, shards=1)
    (shards / "manifest.json").unlink()  # a folder of tars: the index's own lines are the second opinion
    index = shards / "shard-000000.idx"
    index.write_text("\n".join(["v1.2 5", *index_lines(index)[1:]]) + "\n")
    for backend in BACKENDS:
        assert read(shards, backend) == refusal(shards, f"its first line says 5 samples but it lists {SIZE}"), backend
