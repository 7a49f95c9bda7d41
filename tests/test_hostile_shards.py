"""Hostile and broken shard sets, inputs and output folders: refused or skipped with one line.

Every fixture is made here: small synthetic shards (webdataset's TarWriter + DALI's wds2idx),
FIFOs, symlink loops, a full tmpfs, a held OUT_DIR lock and a local S3 server (moto).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import loaders
from ecomaug.cli import main as cli
import loaders.convert as convert
from loaders.convert import out_dir as convert_out_dir
from loaders.convert import shard_writer
from loaders.build import dali_available
from loaders.manifest import load_shard_set, write_json_atomic

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
WDS2IDX = Path(sys.executable).with_name("wds2idx")


# ----------------------------------------------------------------------------- fixtures
def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    stream = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).resize((96, 80)).save(stream, "JPEG")
    return stream.getvalue()


def make_shards(out: Path, sizes: list[int], *, counts: list[int] | None = None, members=None,
                item_id=None) -> dict:
    """Shards of ``sizes`` samples with DALI indexes and a manifest claiming ``counts``.

    ``members(number, index)`` may give a sample's members besides its ``json`` (default: a
    ``jpg``); ``item_id(number, index, key)`` its item (default: its key).
    """
    import webdataset

    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for number, size in enumerate(sizes):
        tar = out / f"shard-{number:06d}.tar"
        with webdataset.TarWriter(str(tar)) as writer:
            for index in range(size):
                key = f"s{number}k{index:02d}"
                item = item_id(number, index, key) if item_id else key
                sample = (members(number, index) if members else None) or {"jpg": jpeg(number * 100 + index)}
                writer.write({"__key__": key, "json": json.dumps({"key": key, "item_id": item}).encode(),
                              **sample})
        subprocess.run([str(WDS2IDX), str(tar), str(tar.with_suffix(".idx"))], check=True, capture_output=True)
        entries.append({"tar": tar.name, "index": tar.with_suffix(".idx").name,
                        "count": size if counts is None else counts[number], "bytes": tar.stat().st_size,
                        "groups": {}})
    manifest = {"format": "ecomaug-shards", "format_version": 1, "ecomaug_version": "test",
                "input": "synthetic", "options": {}, "job": {"index": 0, "count": 1}, "shards": entries,
                "groups": {}, "totals": {"inputs": sum(sizes), "written": sum(sizes), "skipped": 0}}
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def keys(size: list[int]) -> list[str]:
    return [f"s{number}k{index:02d}" for number, count in enumerate(size) for index in range(count)]


def read_all(shards, **options) -> tuple[object, list]:
    settings = {"backend": "torch", "device": "cpu", "batch_size": 4, "crop_size": 32, "num_workers": 0}
    settings.update(options)
    loader = loaders.build_loader(shards, **settings)
    return loader, list(loader)


def within(seconds: float, function, *, fifos: list[Path] = ()):
    """Run ``function`` in a thread; if it is still blocked after ``seconds`` (a FIFO opened for
    reading waits for a writer), open the FIFOs for writing to free it and fail the test."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 -- handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"blocked for more than {seconds} s (waiting on a FIFO)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


# ----------------------------------------------------------------------------- security
UNSAFE_ENTRIES = ["pipe:touch {marker}; cat shard-000000.tar", "/etc/passwd", "../outside.tar",
                  "sub/../../outside.tar", "s3://bucket/shard-000000.tar", "file:///etc/passwd",
                  "~/shard.tar"]


@pytest.mark.parametrize("field", ["tar", "index"])
@pytest.mark.parametrize("entry", UNSAFE_ENTRIES)
def test_an_unsafe_manifest_entry_is_refused_and_never_opened(tmp_path, monkeypatch, entry, field):
    marker = tmp_path / "PWNED"
    shards = tmp_path / "shards"
    manifest = make_shards(shards, [4])
    manifest["shards"][0][field] = entry.format(marker=marker)
    write_json_atomic(shards / "manifest.json", manifest)
    monkeypatch.chdir(shards)  # "." joined to "pipe:..." is "pipe:...": webdataset ran it in a shell
    for source in (".", "manifest.json", str(shards)):
        with pytest.raises(ValueError, match="not a plain relative file name inside the manifest's folder"):
            read_all(source, mode="eval")
    assert not marker.exists()


def test_ecomaug_embed_refuses_a_pipe_entry_in_one_line(tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    shards = tmp_path / "shards"
    manifest = make_shards(shards, [4])
    manifest["shards"][0]["tar"] = f"pipe:touch {marker}; cat shard-000000.tar"
    write_json_atomic(shards / "manifest.json", manifest)
    monkeypatch.chdir(shards)
    result = CliRunner().invoke(cli, ["embed", "--random-init", "test_resnet", "--input-size", "32",
                                      "--data", ".", "--out", str(tmp_path / "e.npz"), "--no-progress",
                                      "--device", "cpu"])
    assert "plain relative file name" in one_error_line(result)
    assert not marker.exists()


def test_a_pipe_url_the_user_types_still_reads(tmp_path):
    make_shards(tmp_path, [6])
    loader, batches = read_all(f"pipe:cat {tmp_path / 'shard-000000.tar'}", epoch_samples=6, mode="eval")
    assert {key for batch in batches for key in batch.keys} == set(keys([6]))


# ----------------------------------------------------------------------------- counts
def test_counts_larger_than_the_shards_hold_are_corrected_with_a_warning(tmp_path, caplog):
    make_shards(tmp_path, [10, 10], counts=[40, 40])  # planned 16 batches and ran 4, silently
    with caplog.at_level(logging.WARNING, logger="loaders.manifest"):
        loader, batches = read_all(tmp_path, batch_size=5)
    assert len(loader) == len(batches) == 4
    assert "says shard-000000.tar holds 40 samples but its index shard-000000.idx says 10" in caplog.text


def test_counts_smaller_than_the_shards_hold_lose_no_sample(tmp_path, caplog):
    make_shards(tmp_path, [20, 20], counts=[16, 16])  # read 16 of every 20, silently
    with caplog.at_level(logging.WARNING, logger="loaders.manifest"):
        loader, batches = read_all(tmp_path, batch_size=5, mode="eval")
    assert sorted(key for batch in batches for key in batch.keys) == keys([20, 20])
    assert "says 20; using 20" in caplog.text


def test_without_an_index_the_tar_itself_gives_the_count(tmp_path, caplog):
    manifest = make_shards(tmp_path, [7, 5], counts=[30, 30])
    for entry in manifest["shards"]:
        (tmp_path / entry.pop("index")).unlink()
    write_json_atomic(tmp_path / "manifest.json", manifest)
    with caplog.at_level(logging.WARNING, logger="loaders.manifest"):
        shard_set = load_shard_set(tmp_path)
    assert [shard.count for shard in shard_set.shards] == [7, 5]
    assert "the tar itself says 7" in caplog.text


# ----------------------------------------------------------------------------- broken tars
def break_tar(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2 + 100], "zero-byte": b"",
                      "random": np.random.default_rng(0).bytes(len(data))}[how])


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("how", ["truncated", "zero-byte", "random"])
def test_a_broken_tar_is_skipped_and_counted_and_the_epoch_keeps_its_length(tmp_path, how, workers):
    make_shards(tmp_path, [10, 10])
    break_tar(tmp_path / "shard-000001.tar", how)
    loader, batches = read_all(tmp_path, batch_size=5, num_workers=workers)
    assert len(loader) == len(batches) == 4
    assert all(batch.views[0].shape == (5, 3, 32, 32) for batch in batches)
    assert loader.corrupt_count == {"truncated": 5, "zero-byte": 10, "random": 10}[how]

    loader, batches = read_all(tmp_path, batch_size=5, num_workers=workers, mode="eval")
    seen = [key for batch in batches for key in batch.keys]
    readable = {"truncated": 5, "zero-byte": 0, "random": 0}[how]
    assert seen == keys([10]) + keys([0, readable])[:readable]
    assert loader.corrupt_count == 10 - readable


@needs_dali
@pytest.mark.parametrize("how", ["truncated", "zero-byte", "random"])
def test_dali_skips_and_counts_what_a_broken_tar_lost(tmp_path, how):
    make_shards(tmp_path, [10, 10])
    break_tar(tmp_path / "shard-000001.tar", how)
    loader, batches = read_all(tmp_path, backend="dali", batch_size=5, num_workers=1, mode="eval")
    readable = {"truncated": 5, "zero-byte": 0, "random": 0}[how]
    assert sorted(key for batch in batches for key in batch.keys) == keys([10]) + keys([0, readable])[:readable]
    assert loader.corrupt_count == 10 - readable


@pytest.mark.parametrize("workers", [0, 1])
def test_a_broken_tar_with_corrupt_raise_is_one_error_naming_the_shard(tmp_path, workers):
    make_shards(tmp_path, [4, 4])
    break_tar(tmp_path / "shard-000001.tar", "zero-byte")
    with pytest.raises(ValueError) as caught:
        read_all(tmp_path, corrupt="raise", num_workers=workers, mode="eval")
    message = str(caught.value)
    assert "\n" not in message and "shard-000001.tar" in message and "unreadable after 0 samples" in message


def test_a_shard_shorter_than_its_index_is_refused_not_silently_short(tmp_path):
    make_shards(tmp_path, [6, 6])
    import webdataset  # rewrite shard 1 with 2 samples, its index still says 6

    with webdataset.TarWriter(str(tmp_path / "shard-000001.tar")) as writer:
        for index in range(2):
            writer.write({"__key__": f"s1k{index:02d}", "jpg": jpeg(100 + index), "json": b"{}"})
    with pytest.raises(ValueError, match=r"shard-000001.idx does not match its shard .*shard-000001.tar"):
        read_all(tmp_path, batch_size=3)  # a stale index (a truncated tar is counted: above)


# ----------------------------------------------------------------------------- manifest schema
@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(shards="oops"), "'shards' must be a list"),
    (lambda m: m["shards"][0].pop("count"), r"shards\[0\] has no 'count'"),
    (lambda m: m["shards"][0].pop("tar"), r"shards\[0\] has no 'tar'"),
    (lambda m: m["shards"][0].update(count="12"), r"shards\[0\].count must be an integer >= 0"),
    (lambda m: m["shards"][0].update(count=-1), r"shards\[0\].count must be an integer >= 0"),
    (lambda m: m["shards"][0].update(count=True), r"shards\[0\].count must be an integer >= 0"),
    (lambda m: m["shards"][0].update(tar=7), r"shards\[0\].tar must be a file name"),
    (lambda m: m.update(shards=[3]), r"shards\[0\] must be an object"),
    (lambda m: m.update(totals=[]), "'totals' must be an object"),
])
def test_a_malformed_manifest_is_one_value_error(tmp_path, change, match):
    manifest = make_shards(tmp_path, [3])
    change(manifest)
    write_json_atomic(tmp_path / "manifest.json", manifest)
    with pytest.raises(ValueError, match="malformed manifest: " + match):
        load_shard_set(tmp_path)


def test_a_missing_shard_is_named_when_the_set_is_loaded(tmp_path):
    make_shards(tmp_path, [3, 3])
    (tmp_path / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError) as caught:
        load_shard_set(tmp_path)
    assert caught.value.filename == str(tmp_path / "shard-000001.tar")


# ----------------------------------------------------------------------------- special files
def test_a_fifo_manifest_or_shard_is_refused_not_waited_on(tmp_path):
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "manifest.json")
    with pytest.raises(ValueError, match="not a regular file"):
        within(20, lambda: load_shard_set(fifo_dir), fifos=[fifo_dir / "manifest.json"])
    with pytest.raises(ValueError, match="not a regular file"):
        within(20, lambda: load_shard_set(fifo_dir / "manifest.json"), fifos=[fifo_dir / "manifest.json"])
    tars = tmp_path / "tars"
    tars.mkdir()
    os.mkfifo(tars / "shard-000000.tar")
    with pytest.raises(ValueError, match="not a regular file"):
        within(20, lambda: load_shard_set(tars), fifos=[tars / "shard-000000.tar"])


def special_folder(root: Path, sample_dir: Path) -> dict[str, str]:
    """Two images and one of each entry that is not a regular file; returns name -> detail."""
    images = root / "images"
    images.mkdir(parents=True)
    pictures = sorted((sample_dir / "images").rglob("*.jpg"))[:2]
    for number, picture in enumerate(pictures):
        (images / f"real-{number}.jpg").write_bytes(picture.read_bytes())
    (images / "loop").symlink_to("loop")
    (images / "dangling.jpg").symlink_to("nowhere.jpg")
    os.mkfifo(images / "pipe.jpg")
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "x.jpg").write_bytes(pictures[0].read_bytes())
    (images / "linked-folder").symlink_to(root / "elsewhere")
    (images / "link-to-real.jpg").symlink_to(images / "real-0.jpg")  # a link to a file is an input
    return {"loop": "symlink loop", "dangling.jpg": "dangling symlink", "pipe.jpg": "FIFO",
            "linked-folder": "symlink to a folder (not followed)"}


def test_special_entries_in_a_folder_are_skipped_with_a_reason_and_counts_reconcile(tmp_path, sample_dir):
    expected = special_folder(tmp_path, sample_dir)
    out = tmp_path / "out"
    report = within(120, lambda: convert.convert_to_shards(tmp_path / "images", out, workers=0, progress=False),
                    fifos=[tmp_path / "images" / "pipe.jpg"])
    skipped = {record["source"]: record for record in loaders.manifest.iter_skipped(out)}
    assert {source: record["detail"] for source, record in skipped.items()
            if record["reason"] == "not a regular file"} == expected
    assert report.inputs == report.written + report.skipped == 7
    # a symlink to a file is an input: it and real-0.jpg are the same bytes, one of them written
    assert report.written == 2
    assert [record["reason"] for source, record in skipped.items()
            if source in ("link-to-real.jpg", "real-0.jpg")] == ["duplicate bytes"]


def test_a_fifo_input_manifest_or_row_is_refused_not_waited_on(tmp_path, sample_dir):
    os.mkfifo(tmp_path / "items.csv")
    with pytest.raises(ValueError, match="not a regular file or a folder"):
        within(20, lambda: convert.convert_to_shards(tmp_path / "items.csv", tmp_path / "o1", workers=0,
                                                     progress=False), fifos=[tmp_path / "items.csv"])
    picture = sorted((sample_dir / "images").rglob("*.jpg"))[0]
    (tmp_path / "a.jpg").write_bytes(picture.read_bytes())
    os.mkfifo(tmp_path / "b.jpg")
    (tmp_path / "rows.csv").write_text("path,item_id\na.jpg,1\nb.jpg,2\n")
    report = within(60, lambda: convert.convert_to_shards(tmp_path / "rows.csv", tmp_path / "o2", workers=0,
                                                          progress=False), fifos=[tmp_path / "b.jpg"])
    assert (report.inputs, report.written, report.skipped_by_reason) == (2, 1, {"not a regular file": 1})


# ----------------------------------------------------------------------------- full disk
def leftovers(out: Path) -> list[str]:
    return sorted(path.name for path in out.iterdir() if path.name.endswith(".tmp") or path.name.startswith(".lock"))


def test_a_full_disk_is_one_line_with_no_temporary_left_and_the_rerun_resumes(tmp_path, sample_manifest,
                                                                                monkeypatch):
    out = tmp_path / "out"
    real_write = shard_writer.ShardWriter.write
    calls = {"n": 0}

    def write_until_full(self, *args):
        calls["n"] += 1
        if calls["n"] > 20:
            self.stream.write(b"\0" * 100)  # some bytes reached the temporary file, then the disk filled
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args)

    monkeypatch.setattr(shard_writer.ShardWriter, "write", write_until_full)
    arguments = ["shard", str(sample_manifest), str(out), "--no-progress", "--workers", "0", "--shard-size", "8"]
    line = one_error_line(CliRunner().invoke(cli, arguments))
    assert "the disk is full" in line and str(out) in line
    assert leftovers(out) == [] and (out / ".convert-journal.jsonl").exists()
    monkeypatch.setattr(shard_writer.ShardWriter, "write", real_write)
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0 and "(resumed)" in result.output
    assert json.loads((out / "manifest.json").read_text())["totals"]["written"] == 320
    assert leftovers(out) == []


def test_a_full_tmpfs_is_one_line_with_no_temporary_left(tmp_path, sample_manifest):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        out = mount / "out"
        result = CliRunner().invoke(cli, ["shard", str(sample_manifest), str(out), "--no-progress",
                                          "--workers", "0", "--quality", "100"])
        assert "the disk is full" in one_error_line(result)
        assert leftovers(out) == []
    finally:
        unmounted = subprocess.run(["umount", str(mount)], capture_output=True)
        if unmounted.returncode != 0:  # busy: a file in it is still open (a leaked descriptor)
            subprocess.run(["umount", "-l", str(mount)], check=True)
            pytest.fail(f"a file on the full disk was left open: {unmounted.stderr.decode().strip()}")


# ----------------------------------------------------------------------------- lock
def test_a_second_run_into_a_locked_out_dir_says_who_holds_it(tmp_path, sample_manifest):
    out = tmp_path / "out"
    out.mkdir()
    arguments = ["shard", str(sample_manifest), str(out), "--no-progress", "--workers", "0"]
    with convert_out_dir.out_dir_lock(out / ".lock"):
        line = one_error_line(CliRunner().invoke(cli, arguments))
        assert "being written by another" in line
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in line
        assert sorted(path.name for path in out.iterdir()) == [".lock"]  # nothing touched
    assert CliRunner().invoke(cli, arguments).exit_code == 0
    assert leftovers(out) == []


def test_split_jobs_lock_only_their_own_job(tmp_path, sample_manifest):
    out = tmp_path / "out"
    out.mkdir()
    with convert_out_dir.out_dir_lock(out / ".lock-j000"):
        with pytest.raises(convert.OutDirLocked):
            convert.convert_to_shards(sample_manifest, out, num_jobs=2, job_index=0, workers=0, progress=False)
        report = convert.convert_to_shards(sample_manifest, out, num_jobs=2, job_index=1, workers=0,
                                           progress=False)
    assert report.written > 0 and (out / "manifest-j001.json").exists()


def test_two_processes_one_lock(tmp_path):
    path = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from loaders.convert.out_dir import out_dir_lock\n"
        f"with out_dir_lock(Path({str(path)!r})):\n    print('held', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(convert.OutDirLocked, match=f"pid {holder.pid} "):
            with convert_out_dir.out_dir_lock(path):
                pass
    finally:
        holder.communicate("", timeout=60)
    with convert_out_dir.out_dir_lock(path):  # released by the other process: free again
        assert path.exists()
    assert not path.exists()


# ----------------------------------------------------------------------------- backends
@needs_dali
def test_dali_cpu_and_dali_gpu_are_backends_build_loader_accepts(tmp_path):
    make_shards(tmp_path, [8, 8])
    loader, batches = read_all(tmp_path, backend="dali-cpu", num_workers=1)
    assert loader.backend == "dali-cpu" and len(batches) == len(loader) == 4
    assert batches[0].views[0].shape == (4, 3, 32, 32) and batches[0].views[0].device.type == "cpu"
    with pytest.raises(ValueError, match="backend='dali-gpu' decodes on a CUDA device"):
        read_all(tmp_path, backend="dali-gpu", num_workers=1)


@needs_dali
@needs_cuda
def test_dali_cpu_on_a_cuda_device_and_dali_gpu(tmp_path):
    make_shards(tmp_path, [8, 8])
    for backend in ("dali-cpu", "dali-gpu"):
        loader, batches = read_all(tmp_path, backend=backend, device="cuda", num_workers=1)
        assert loader.backend == backend and len(batches) == len(loader) == 4
        assert batches[0].views[0].device.type == "cuda"


# ----------------------------------------------------------------------------- S3 (moto server, tests/conftest.py)
@pytest.fixture
def s3_shards(s3_client, tmp_path):
    """Two shards (5 and 7 samples) at s3://<bucket>/shards/ on the local server; the local copy."""
    client = s3_client
    bucket = f"ecomaug-{tmp_path.name.lower().replace('_', '-')}"[:60]
    local = tmp_path / "local"
    make_shards(local, [5, 7])
    client.create_bucket(Bucket=bucket)
    for path in local.iterdir():
        client.upload_file(str(path), bucket, f"shards/{path.name}")
    return f"s3://{bucket}/shards", local, client


def test_an_s3_folder_reads_its_manifest_and_streams_every_sample(s3_shards):
    url, local, _ = s3_shards
    for source in (f"{url}/", url, f"{url}/manifest.json"):
        shard_set = load_shard_set(source)
        assert [s.count for s in shard_set.shards] == [5, 7]
        assert shard_set.shards[0].url == f"{url}/shard-000000.tar"
    for workers in (0, 1):
        loader, batches = read_all(f"{url}/", mode="eval", num_workers=workers)
        assert loader.backend == "torch" and len(loader) == len(batches) == 3
        assert [key for batch in batches for key in batch.keys] == keys([5, 7])
    loader, batches = read_all(f"{url}/shard-000001.tar", epoch_samples=7, mode="eval")
    assert {key for batch in batches for key in batch.keys} == set(keys([0, 7]))


def test_webdataset_itself_reads_s3_once_a_shard_set_was_loaded(s3_shards):
    import webdataset

    url, _, _ = s3_shards
    load_shard_set(f"{url}/")
    samples = list(webdataset.WebDataset(f"{url}/shard-000000.tar", shardshuffle=False, empty_check=False))
    assert [sample["__key__"] for sample in samples] == keys([5])


def test_a_remote_manifest_whose_counts_lie_is_corrected_from_the_remote_index(s3_shards, caplog):
    url, local, client = s3_shards
    manifest = json.loads((local / "manifest.json").read_text())
    manifest["shards"][1]["count"] = 70
    bucket = url.split("/")[2]
    client.put_object(Bucket=bucket, Key="shards/manifest.json", Body=json.dumps(manifest).encode())
    with caplog.at_level(logging.WARNING, logger="loaders.manifest"):
        assert [shard.count for shard in load_shard_set(url).shards] == [5, 7]
    assert "holds 70 samples but its index shard-000001.idx says 7" in caplog.text


def test_a_remote_manifest_entry_with_a_scheme_is_refused(s3_shards):
    url, local, client = s3_shards
    manifest = json.loads((local / "manifest.json").read_text())
    manifest["shards"][0]["tar"] = "pipe:cat /etc/passwd"
    client.put_object(Bucket=url.split("/")[2], Key="shards/manifest.json", Body=json.dumps(manifest).encode())
    with pytest.raises(ValueError, match="plain relative file name"):
        load_shard_set(url)


def test_an_empty_s3_prefix_is_one_error(s3_shards):
    url, _, _ = s3_shards
    with pytest.raises(ValueError, match="no manifest.json and no .tar shards at this URL"):
        load_shard_set(url.replace("/shards", "/nothing-here/"))


@pytest.mark.slow
def test_train_py_trains_on_s3_shards(s3_shards, tmp_path):
    from ecomaug import engine
    from ecomaug.config import parse_config

    url, _, _ = s3_shards
    config = parse_config(["--data", f"{url}/", "--out", str(tmp_path / "run"), "--model", "test_resnet",
                           "--crop-size", "32", "--batch-size", "4", "--queue-size", "8", "--opt", "adamw",
                           "--warmup-epochs", "0", "--no-channels-last", "--no-progress", "--backend", "auto",
                           "--num-workers", "0", "--hidden-dim", "32", "--dim", "16", "--max-steps", "3",
                           "--log-every", "1", "--no-export"])
    engine.train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(record["event"] == "train" for record in records) >= 1


def test_a_remote_shard_longer_than_its_unindexed_count_warns(s3_shards, caplog):
    url, local, client = s3_shards
    manifest = json.loads((local / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry["index"] = None
    manifest["shards"][0]["count"] = 3  # holds 5; with no index only reading the tar can tell
    client.put_object(Bucket=url.split("/")[2], Key="shards/manifest.json", Body=json.dumps(manifest).encode())
    with caplog.at_level(logging.WARNING, logger="loaders.torch_backend"):
        loader, batches = read_all(url, mode="eval")
    assert len([key for batch in batches for key in batch.keys]) == 10
    assert "shard-000000.tar holds more samples than its count 3" in caplog.text


def test_a_scheme_whose_fsspec_package_is_missing_names_the_extra():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(ImportError, match=r"gcsfs: pip install 'ecomaug\[gcs\]'"):
        load_shard_set("gs://bucket/shards/")


def test_a_missing_object_or_an_unreachable_store_is_one_error_before_any_worker(s3_shards, monkeypatch):
    url, _, _ = s3_shards
    with pytest.raises(FileNotFoundError) as caught:
        read_all(f"{url}/shard-000009.tar", epoch_samples=4, num_workers=1)
    assert caught.value.filename == f"{url}/shard-000009.tar"
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import fsspec

    fsspec.get_filesystem_class("s3").clear_instance_cache()  # s3fs caches the instance and its endpoint
    with pytest.raises(ValueError, match="cannot read from the object store"):
        read_all(f"{url}/shard-000000.tar", epoch_samples=4, num_workers=1)
