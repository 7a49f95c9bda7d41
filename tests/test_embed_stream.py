"""Streaming embed: parts written as computed, resumable after SIGKILL, ranks, hostile shards."""

from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ecomaug.cli import main
from ecomaug.evaluation.embed import (embed_data, embed_to_parts, load_embeddings,
                                      random_init_model)

MODEL, SIZE = "efficientnet_b0", 64
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return random_init_model(MODEL, device=torch.device("cpu"), input_size=SIZE)


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory, sample_manifest) -> Path:
    """The first 96 rows of the bundled sample, as a manifest of absolute paths."""
    rows = list(csv.DictReader(open(sample_manifest, newline="")))[:96]
    for row in rows:
        row["path"] = str(sample_manifest.parent / row["path"])
    out = tmp_path_factory.mktemp("small") / "items.csv"
    with open(out, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_parts_read_as_one_set_equal_to_a_single_file(model, small_manifest, tmp_path):
    single = embed_data(model, small_manifest, batch_size=16, progress=False)
    report = embed_to_parts(model, small_manifest, tmp_path / "parts", batch_size=16,
                            part_size=40, progress=False)
    assert (report.rows, report.parts, report.seen, report.skipped) == (96, 3, 96, [])
    parts = load_embeddings(tmp_path / "parts")
    assert parts.keys == single.keys and parts.meta == single.meta
    torch.testing.assert_close(parts.vectors, single.vectors, rtol=1e-4, atol=1e-5)
    assert parts.info["parts"] == 3 and parts.info["model"] == MODEL


def test_ranks_split_the_data_and_read_back_in_order(model, small_manifest, tmp_path):
    folder = tmp_path / "ranks"
    first = embed_to_parts(model, small_manifest, folder, part_size=20, rank=0, world_size=2,
                           progress=False)
    with pytest.raises(ValueError, match=r"ranks \[1\] of 2 have not finished"):
        load_embeddings(folder)
    second = embed_to_parts(model, small_manifest, folder, part_size=20, rank=1, world_size=2,
                            progress=False)
    assert (first.rows, second.rows) == (48, 48)  # loaders.sharding.rank_range: [0,48), [48,96)
    both = load_embeddings(folder)
    single = embed_data(model, small_manifest, progress=False)
    assert both.keys == single.keys
    with pytest.raises(ValueError, match="split 2 ways, not 3"):
        embed_to_parts(model, small_manifest, folder, rank=0, world_size=3, progress=False)


def test_parts_survive_sigkill_and_a_rerun_completes_them(small_manifest, tmp_path):
    folder = tmp_path / "killed"
    command = [sys.executable, "-m", "ecomaug", "embed", "--random-init", MODEL, "--input-size",
               str(SIZE), "--data", str(small_manifest), "--out", str(folder), "--part-size", "8",
               "--batch-size", "8", "--device", "cpu", "--no-progress"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (folder / "part-r00000-000001.npz").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no part written"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not list(folder.glob("done-*.json")), "killed too late: the run had finished"
    written = len(list(folder.glob("part-r*.npz")))
    assert 2 <= written < 12
    with pytest.raises(ValueError, match="not finished"):
        load_embeddings(folder)
    result = CliRunner().invoke(main, command[3:])
    assert result.exit_code == 0, result.output
    assert f"{written} of them from an earlier run" in result.output or \
        f"{written - 1} of them from an earlier run" in result.output  # the last may be cut
    assert not list(folder.glob(".*.tmp.npz"))
    resumed = load_embeddings(folder)
    clean = embed_data(random_init_model(MODEL, device=torch.device("cpu"), input_size=SIZE),
                       small_manifest, batch_size=8, progress=False)
    assert resumed.keys == clean.keys
    torch.testing.assert_close(resumed.vectors, clean.vectors, rtol=1e-4, atol=1e-5)


def test_a_folder_of_another_model_is_refused(model, small_manifest, tmp_path):
    embed_to_parts(model, small_manifest, tmp_path / "p", part_size=50, progress=False)
    other = random_init_model("resnet18", device=torch.device("cpu"), input_size=SIZE)
    with pytest.raises(ValueError, match="made with another model"):
        embed_to_parts(other, small_manifest, tmp_path / "p", part_size=50, progress=False)


@pytest.fixture(scope="module")
def hostile_shards(sample_shards, tmp_path_factory) -> Path:
    """One good shard, plus a truncated, a zero-byte and a random-bytes one, no manifest."""
    folder = tmp_path_factory.mktemp("hostile")
    good = (sample_shards / "shard-000000.tar").read_bytes()
    (folder / "shard-000000.tar").write_bytes(good)
    (folder / "shard-000001.tar").write_bytes(good[: len(good) // 2 + 100])
    (folder / "shard-000002.tar").write_bytes(b"")
    (folder / "shard-000003.tar").write_bytes(np.random.default_rng(0).bytes(30000))
    return folder


def test_bad_shards_are_skipped_and_listed(hostile_shards, tmp_path):
    out = tmp_path / "parts"
    result = CliRunner().invoke(main, ["embed", "--random-init", MODEL, "--input-size", str(SIZE),
                                       "--data", str(hostile_shards), "--out", str(out),
                                       "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "3 skipped" in result.output
    skipped = (out / "skipped-r00000.jsonl").read_text().splitlines()
    assert len(skipped) == 3
    for name, reason in (("shard-000001", "unexpected end of data"), ("shard-000002", "empty"),
                         ("shard-000003", "ReadError")):
        assert any(name in line and reason in line for line in skipped), (name, skipped)
    embeddings = load_embeddings(out)
    # all 64 of the good shard, and the samples of the truncated one read before it broke
    assert 64 < len(embeddings.keys) < 128


@pytest.mark.parametrize("name", ["shard-000001", "shard-000002", "shard-000003"])
def test_a_bad_shard_is_one_line_for_a_single_file(hostile_shards, tmp_path, name):
    result = CliRunner().invoke(main, ["embed", "--random-init", MODEL, "--input-size", str(SIZE),
                                       "--data", str(hostile_shards / f"{name}.tar"),
                                       "--out", str(tmp_path / "e.npz"), "--device", "cpu",
                                       "--no-progress"])
    if name == "shard-000001":  # truncated: the samples before the break are embedded, the break listed
        assert result.exit_code == 0, result.output
        assert "1 shards of unknown count unreadable" in result.output
        assert name in (tmp_path / "e.skipped.jsonl").read_text()
        return
    assert result.exit_code == 2, result.output  # nothing to embed
    assert result.output.count("\n") == 1 and name in result.output and "Traceback" not in result.output


def test_a_non_tar_file_is_one_line(tmp_path):
    data = tmp_path / "notes.txt"
    data.write_text("hello\n")
    result = CliRunner().invoke(main, ["embed", "--random-init", MODEL, "--data", str(data),
                                       "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "notes.txt: not shards" in result.output


def test_duplicate_keys_are_kept_and_counted(sample_shards, tmp_path):
    source = tarfile.open(sample_shards / "shard-000000.tar")
    members = source.getmembers()[:4]  # two samples: jpg + json each
    with tarfile.open(tmp_path / "dup.tar", "w") as out:
        for member in members + members[:2]:  # the first sample again, later in the tar
            out.addfile(member, source.extractfile(member))
    result = CliRunner().invoke(main, ["embed", "--random-init", MODEL, "--input-size", str(SIZE),
                                       "--data", str(tmp_path / "dup.tar"), "--out",
                                       str(tmp_path / "parts"), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1 samples repeat a key" in result.output
    embeddings = load_embeddings(tmp_path / "parts")
    first = members[0].name.split(".")[0]
    assert embeddings.keys == [first, members[2].name.split(".")[0], f"{first}~1"]
    assert embeddings.meta[2]["duplicate_of"] == first
    torch.testing.assert_close(embeddings.vectors[0], embeddings.vectors[2])


@pytest.mark.parametrize("out_name", ["e.npz", "parts"])
def test_a_full_disk_is_one_line_and_leaves_no_temp_file(monkeypatch, small_manifest, tmp_path,
                                                         out_name):
    import loaders.atomic

    def full(self, data):
        self.stream.write(bytes(data)[:10])  # half a file, then the disk is full
        self.error = OSError(errno.ENOSPC, "No space left on device")
        raise self.error

    monkeypatch.setattr(loaders.atomic._WholeWrites, "write", full)
    result = CliRunner().invoke(main, ["embed", "--random-init", MODEL, "--input-size", str(SIZE),
                                       "--data", str(small_manifest), "--out",
                                       str(tmp_path / out_name), "--device", "cpu",
                                       "--no-progress"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: disk full while writing") and \
        result.output.count("\n") == 1
    assert str(tmp_path) in result.output
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "items.csv"]


def test_torchrun_environment_picks_the_rank(monkeypatch, small_manifest, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(main, ["embed", "--random-init", MODEL, "--input-size", str(SIZE),
                                       "--data", str(small_manifest), "--out", str(tmp_path),
                                       "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("rank 1/2: 48 embeddings")
    assert [p.name for p in tmp_path.glob("done-*.json")] == ["done-r00001-of-00002.json"]
