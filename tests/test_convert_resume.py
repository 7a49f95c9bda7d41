"""Crash safety: a conversion killed mid-run finishes on the next run with every input exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import loaders.convert.run as convert_module
from loaders.convert import convert_to_shards
from loaders.manifest import iter_skipped

REPO = Path(__file__).resolve().parents[1]

# A conversion in its own process, slowed by an image_hook so that it can be killed mid-run.
SCRIPT = textwrap.dedent("""
    import json, sys, time
    from loaders.convert import convert_to_shards

    def slow_hook(image):
        time.sleep(0.03)
        return image, {}, False

    if __name__ == "__main__":
        report = convert_to_shards(sys.argv[1], sys.argv[2], shard_size=4, workers=1, progress=False,
                                   image_hook=slow_hook)
        print(json.dumps({"resumed": report.resumed, "processed": report.processed,
                          "written": report.written, "skipped": report.skipped}))
""")


def _photo_folder(root: Path, count: int) -> Path:
    root.mkdir(parents=True)
    for number in range(count):
        generator = np.random.default_rng(number)
        small = generator.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 48)).save(root / f"img-{number:03d}.jpg", "JPEG", quality=90)
    # Duplicates late in the order: a resumed run must still know what the first part wrote.
    for number in (0, 1, 2):
        shutil.copy(root / f"img-{number:03d}.jpg", root / f"zz-copy-{number}.jpg")
    (root / "zz-broken.jpg").write_bytes(b"not a jpeg")
    return root


def _samples(out: Path) -> dict[str, bytes]:
    """key -> jpeg bytes over all final tars; fails on a truncated tar or a key written twice."""
    samples: dict[str, bytes] = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as archive:
            members = archive.getmembers()
            index = tar_path.with_suffix(".idx").read_text().splitlines()
            assert int(index[0].split()[1]) == len(members) // 2 == len(index) - 1
            for member in members:
                if member.name.endswith(".jpg"):
                    key = member.name[:-4]
                    assert key not in samples, f"{key} written twice"
                    samples[key] = archive.extractfile(member).read()
    return samples


def _run_script(script: Path, source: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, str(script), str(source), str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path):
    source = _photo_folder(tmp_path / "in", 24)
    script = tmp_path / "convert_slowly.py"
    script.write_text(SCRIPT)
    # The slow hook changes nothing, so an in-process run without it writes the same shards.
    reference = convert_to_shards(source, tmp_path / "reference", shard_size=4, workers=1, progress=False)

    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(script), str(source), str(out)], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / "shard-000001.tar").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the whole group: the parent and its worker
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the conversion ended before it could be killed"
    assert not (out / "manifest.json").exists()
    first_part = _samples(out)  # whatever is under a final name is complete
    assert 0 < len(first_part) < reference.written

    resumed = _run_script(script, source, out)
    assert resumed["resumed"] and resumed["processed"] < 28
    final, expected = _samples(out), _samples(tmp_path / "reference")
    assert final == expected  # same keys, same bytes, nothing twice
    assert resumed["written"] + resumed["skipped"] == 28 == reference.written + reference.skipped
    skipped = sorted((r["source"], r["reason"]) for r in iter_skipped(out))
    assert skipped == sorted((r["source"], r["reason"]) for r in iter_skipped(tmp_path / "reference"))
    assert len(skipped) == 4 and not list(out.glob(".*"))


def test_crash_after_rename_before_journal_redoes_that_shard(tmp_path, monkeypatch):
    source = _photo_folder(tmp_path / "in", 20)
    reference = convert_to_shards(source, tmp_path / "reference", shard_size=3, workers=0, progress=False)

    real_append = convert_module.append_journal
    calls = []

    def crash_on_third_commit(stream, record):
        calls.append(record)
        if len(calls) == 4:  # header, two shards, then the third shard is renamed but not journaled
            raise RuntimeError("simulated crash")
        real_append(stream, record)

    monkeypatch.setattr(convert_module, "append_journal", crash_on_third_commit)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_to_shards(source, tmp_path / "out", shard_size=3, workers=0, progress=False)
    assert (tmp_path / "out" / "shard-000002.tar").exists()
    monkeypatch.setattr(convert_module, "append_journal", real_append)

    report = convert_to_shards(source, tmp_path / "out", shard_size=3, workers=0, progress=False)
    assert report.resumed and report.processed == report.inputs - 6
    assert _samples(tmp_path / "out") == _samples(tmp_path / "reference")
    assert (report.written, report.skipped) == (reference.written, reference.skipped)


def test_rerun_after_completion_and_conflicting_reruns(tmp_path):
    source = _photo_folder(tmp_path / "in", 6)
    out = tmp_path / "out"
    first = convert_to_shards(source, out, shard_size=4, workers=0, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = convert_to_shards(source, out, shard_size=4, workers=0, progress=False)
    assert again.already_complete and (again.written, again.skipped) == (first.written, first.skipped)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    with pytest.raises(ValueError, match="quality"):
        convert_to_shards(source, out, shard_size=4, quality=70, workers=0, progress=False)
    (out / "manifest.json").unlink()  # shards without a manifest or journal: not ours to overwrite
    with pytest.raises(ValueError, match="already holds shards"):
        convert_to_shards(source, out, shard_size=4, workers=0, progress=False)
