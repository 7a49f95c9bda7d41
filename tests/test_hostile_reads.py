"""Hostile data for the readers of ``ecomaug embed``, ``eval`` and ``match``: nothing silent, nothing hangs.

Short shards (cut between members, a corrupt member header, a sample without its image), a FIFO
or a device listed in a CSV manifest, and a corrupt image among good ones: each is skipped and
listed with its key and reason, and the closing line counts what the data promised against what
was read (read = embedded + skipped, promised = read + missing). Every fixture is made here.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ecomaug.cli import main as cli
from ecomaug.evaluation.embed import ReadReport, iter_data, load_embeddings
from test_hostile_shards import WDS2IDX, jpeg, make_shards, within

MODEL = ["--random-init", "test_resnet", "--input-size", "32", "--device", "cpu", "--no-progress"]
ROOT = Path(__file__).resolve().parents[1]


def write_shards(out: Path, sizes: list[int], *, members=None) -> Path:
    """Shards of ``sizes`` samples (two per item_id), DALI indexes and a manifest of the counts.

    ``members(number, index)`` may give a sample's members besides its ``json`` (default: a ``jpg``).
    """
    make_shards(out, sizes, members=members, item_id=lambda number, index, key: f"i{number}-{index // 2}")
    return out


def header_offset(tar: Path, key: str) -> int:
    """Where the header of sample ``key``'s first member starts."""
    with tarfile.open(tar) as archive:
        return min(member.offset for member in archive.getmembers() if member.name.startswith(key + "."))


def skipped_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def reconciles(counts: dict) -> bool:
    return counts["read"] == counts["embedded"] + counts["skipped"] and \
        counts["promised"] == counts["read"] + counts["missing"]


# ----------------------------------------------------------------------------- 1: short reads
@pytest.fixture
def cut_shards(tmp_path) -> Path:
    """Two shards of 8 whose manifest and indexes say 16: shard 1 cut cleanly before sample 5."""
    shards = write_shards(tmp_path / "cut", [8, 8])
    tar = shards / "shard-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[:header_offset(tar, "s1k05")])
    return shards


CUT_KEYS = ["s1k05", "s1k06", "s1k07"]


def test_embed_npz_lists_each_missing_sample_and_the_shortfall(cut_shards, tmp_path):
    out = tmp_path / "e.npz"
    result = CliRunner().invoke(cli, ["embed", *MODEL, "--data", str(cut_shards), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "13 of 16 promised samples embedded: 13 read (0 skipped), 3 missing from the data" in result.output
    records = skipped_lines(tmp_path / "e.skipped.jsonl")
    assert [record["key"] for record in records] == CUT_KEYS
    assert all(record["missing"] and "short: it ends after 5 samples, its count says 8" in record["reason"]
               and record["where"].endswith("shard-000001.tar") for record in records)
    info = load_embeddings(out).info["read"]
    assert info == {"promised": 16, "read": 13, "embedded": 13, "skipped": 0, "missing": 3, "broken_shards": 0,
                    "repeats": 0}


def test_embed_parts_lists_each_missing_sample_and_the_shortfall(cut_shards, tmp_path):
    out = tmp_path / "parts"
    result = CliRunner().invoke(cli, ["embed", *MODEL, "--data", str(cut_shards), "--out", str(out),
                                      "--part-size", "4"])
    assert result.exit_code == 0, result.output
    assert "13 of 16 promised samples embedded" in result.output and "3 missing" in result.output
    assert [record["key"] for record in skipped_lines(out / "skipped-r00000.jsonl")] == CUT_KEYS
    counts = load_embeddings(out).info["read"]
    assert (counts["embedded"], counts["missing"]) == (13, 3) and reconciles(counts)


@pytest.mark.parametrize("how", ["corrupt member header", "no image member", "jpeg member"])
def test_a_broken_sample_is_not_silently_dropped(tmp_path, how):
    def members(number, index):
        if number == 0 and index == 3 and how == "no image member":
            return {"txt": b"no picture"}
        if number == 0 and index == 3 and how == "jpeg member":
            return {"jpeg": jpeg(3)}
        return None

    shards = write_shards(tmp_path / "s", [6], members=members)
    if how == "corrupt member header":
        tar = shards / "shard-000000.tar"
        data = bytearray(tar.read_bytes())
        offset = header_offset(tar, "s0k03")
        data[offset + 148:offset + 156] = b"0000000\0"  # a wrong checksum: tarfile stops, silently
        tar.write_bytes(bytes(data))
    report = ReadReport()
    keys = [key for key, _, _ in iter_data(shards, report=report)]
    skipped = {record["key"]: record for record in report.skipped}
    if how == "jpeg member":  # an image member the loaders accept is an image here too
        assert len(keys) == 6 and not skipped
    elif how == "no image member":
        assert "s0k03" not in keys and len(keys) == 5
        assert "no image member" in skipped["s0k03"]["reason"] and not skipped["s0k03"].get("missing")
    else:
        assert keys == ["s0k00", "s0k01", "s0k02"]
        assert sorted(skipped) == ["s0k03", "s0k04", "s0k05"] and report.missing == 3
    with pytest.raises(ValueError, match="shard-000000.tar") if how != "jpeg member" else _nothing():
        list(iter_data(shards))  # without a report: one error naming the shard


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False


def test_a_repeated_key_does_not_hide_a_cut(tmp_path):
    """A key written twice in a row is one sample (as the index counts it): the cut after it is still missing."""
    import webdataset

    from ecomaug.evaluation.sources import read_counts

    out = tmp_path / "repeat"
    out.mkdir()
    tar = out / "shard-000000.tar"
    with webdataset.TarWriter(str(tar)) as writer:
        for number, key in enumerate(["a", "a", "b", "c"]):
            writer.write({"__key__": key, "jpg": jpeg(number), "json": json.dumps({"item_id": key}).encode()})
    subprocess.run([str(WDS2IDX), str(tar), str(tar.with_suffix(".idx"))], check=True, capture_output=True)
    cut = header_offset(tar, "c")
    tar.write_bytes(tar.read_bytes()[:cut])  # cut cleanly before c
    report = ReadReport()
    keys = [key for key, _, _ in iter_data(tar, report=report)]
    counts = read_counts(len(keys), report.skipped, 3)
    assert keys == ["a", "b"]
    assert any(record.get("repeat") and record["key"] == "a" for record in report.skipped)
    assert [record["key"] for record in report.skipped if record.get("missing")] == ["c"]
    assert counts == {"promised": 3, "read": 2, "embedded": 2, "skipped": 0, "missing": 1, "broken_shards": 0,
                      "repeats": 1}
    assert reconciles(counts)


def test_eval_and_match_say_what_the_gallery_lacked(cut_shards, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["eval", "--gallery", str(cut_shards), *MODEL, "--out",
                                 str(tmp_path / "report"), "--disturbance", "clean",
                                 "--query-regions", "none"])
    assert result.exit_code == 0, result.output
    assert "gallery: 13 of 16 promised samples used: 13 read (0 skipped), 3 missing" in result.output
    assert [r["key"] for r in skipped_lines(tmp_path / "report" / "skipped.jsonl")] == CUT_KEYS

    result = runner.invoke(cli, ["match", "--a", str(cut_shards), "--b", str(cut_shards), *MODEL,
                                 "--out", str(tmp_path / "match"), "--no-report"])
    assert result.exit_code == 0, result.output
    for side in ("a", "b"):
        assert f"--{side}: 13 of 16 promised samples embedded: 13 read (0 skipped), 3 missing" in result.output


# ----------------------------------------------------------------------------- 2: hangs
@pytest.fixture
def fifo_manifest(tmp_path) -> tuple[Path, Path]:
    """A CSV manifest of four good images, a FIFO and a corrupt image."""
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for index in range(4):
        (images / f"{index}.jpg").write_bytes(jpeg(index))
        rows.append({"path": f"images/{index}.jpg", "item_id": f"item{index // 2}"})
    fifo = images / "pipe.jpg"
    os.mkfifo(fifo)
    rows.insert(2, {"path": "images/pipe.jpg", "item_id": "item0"})
    (images / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(300))
    rows.append({"path": "images/bad.jpg", "item_id": "item1"})
    manifest = tmp_path / "items.csv"
    with open(manifest, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["path", "item_id"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest, fifo


def test_a_fifo_in_a_manifest_is_skipped_by_embed_eval_and_match_not_waited_on(fifo_manifest, tmp_path):
    manifest, fifo = fifo_manifest
    runner = CliRunner()
    for out in ("e.npz", "parts"):
        result = within(60, lambda: runner.invoke(cli, ["embed", *MODEL, "--data", str(manifest),
                                                        "--out", str(tmp_path / out)]), fifos=[fifo])
        assert result.exit_code == 0, result.output
        assert "4 of 6 promised samples embedded: 6 read (2 skipped), 0 missing" in result.output
    for listed in (tmp_path / "e.skipped.jsonl", tmp_path / "parts" / "skipped-r00000.jsonl"):
        fifo_record, bad_record = skipped_lines(listed)
        assert (fifo_record["key"], fifo_record["reason"]) == ("images/pipe.jpg", "not a regular file (a FIFO)")
        assert bad_record["key"] == "images/bad.jpg" and bad_record["reason"].startswith("cannot decode")

    result = within(60, lambda: runner.invoke(cli, ["eval", "--gallery", str(manifest), *MODEL, "--out",
                                                    str(tmp_path / "report"), "--disturbance", "clean",
                                                    "--query-regions", "none"]), fifos=[fifo])
    assert result.exit_code == 0, result.output
    assert "gallery: 4 of 6 promised samples used: 6 read (2 skipped)" in result.output  # no traceback

    result = within(60, lambda: runner.invoke(cli, ["match", "--a", str(manifest), "--b", str(manifest),
                                                    *MODEL, "--out", str(tmp_path / "m"), "--no-report"]),
                    fifos=[fifo])
    assert result.exit_code == 0, result.output
    assert "--a: 4 of 6 promised samples embedded: 6 read (2 skipped)" in result.output


def test_a_device_in_a_manifest_is_refused_not_read_forever(tmp_path):
    """/dev/zero never ends: read in a child whose address space is capped, so a regression is a
    MemoryError there, not a machine out of memory."""
    (tmp_path / "a.jpg").write_bytes(jpeg(0))
    (tmp_path / "items.csv").write_text("path,item_id\na.jpg,x\n/dev/zero,y\n")
    script = (
        "import resource, sys\n"
        "from ecomaug.evaluation.sources import ReadReport, iter_data\n"
        "size = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize'))\n"
        "limit = (size << 10) + (512 << 20)\n"
        "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
        "report = ReadReport()\n"
        "print([key for key, _, _ in iter_data(sys.argv[1], report=report)])\n"
        "print(report.skipped[0]['reason'])\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "items.csv")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["['a.jpg']", "not a regular file (a character device)"]


# ----------------------------------------------------------------------------- 4: a bad image
def test_a_corrupt_image_is_skipped_and_listed_by_embed_npz(tmp_path):
    def members(number, index):
        return {"jpg": b"\xff\xd8\xff\xe0" + np.random.default_rng(index).bytes(500)} if index == 2 else None

    shards = write_shards(tmp_path / "s", [5], members=members)
    out = tmp_path / "e.npz"
    result = CliRunner().invoke(cli, ["embed", *MODEL, "--data", str(shards), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 of 5 promised samples embedded: 5 read (1 skipped), 0 missing" in result.output
    [record] = skipped_lines(tmp_path / "e.skipped.jsonl")
    assert record["key"] == "s0k02" and record["reason"].startswith("cannot decode (")
    embeddings = load_embeddings(out)
    assert embeddings.keys == ["s0k00", "s0k01", "s0k03", "s0k04"] and reconciles(embeddings.info["read"])
