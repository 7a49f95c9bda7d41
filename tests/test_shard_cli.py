"""``ecomaug shard``: a working run, a rerun, and bad invocations as one line with exit code 2."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from PIL import Image

from ecomaug.cli import main
from ecomaug.commands.shard import parse_size


def _invoke(*arguments: str):
    return CliRunner().invoke(main, ["shard", *map(str, arguments)])


def test_shard_the_bundled_sample_then_rerun(sample_manifest, tmp_path):
    out = tmp_path / "shards"
    result = _invoke(sample_manifest, out, "--shard-size", "64", "--workers", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert f"wrote {manifest['totals']['written']} of {manifest['totals']['inputs']} inputs" in result.output
    assert "images/s" in result.output and len(list(out.glob("shard-*.idx"))) == len(manifest["shards"])
    again = _invoke(sample_manifest, out, "--shard-size", "64", "--workers", "1", "--no-progress")
    assert again.exit_code == 0 and "already complete" in again.output


def test_help_shows_a_runnable_example():
    result = CliRunner().invoke(main, ["shard", "--help"])
    assert result.exit_code == 0 and "ecomaug shard ecomaug/assets/sample/items.csv ./shards" in result.output


def _tiny_manifest(tmp_path):
    Image.new("RGB", (64, 48), (10, 120, 200)).save(tmp_path / "a.jpg")
    (tmp_path / "items.csv").write_text("path,item_id,region\na.jpg,1,ID\n")
    return tmp_path / "items.csv"


@pytest.mark.parametrize("case", ["missing input", "empty folder", "unknown balance column",
                                  "unknown path column", "not a manifest", "job index", "shard bytes",
                                  "out is a file", "out under a file"])
def test_bad_invocations_fail_in_one_line_with_exit_2_and_write_nothing(tmp_path, case):
    manifest = _tiny_manifest(tmp_path)
    out = tmp_path / "out"
    arguments, expected = {
        "missing input": ([tmp_path / "nowhere", out], "nowhere"),
        "empty folder": ([(tmp_path / "empty").mkdir() or tmp_path / "empty", out], "no files"),
        "unknown balance column": ([manifest, out, "--balance-by", "regoin"], "regoin"),
        "unknown path column": ([manifest, out, "--path-column", "file"], "file"),
        "not a manifest": ([tmp_path / "a.jpg", out], "manifest"),
        "job index": ([manifest, out, "--num-jobs", "2", "--job-index", "2"], "job_index"),
        "shard bytes": ([manifest, out, "--shard-bytes", "lots"], "lots"),
        "out is a file": ([manifest, tmp_path / "a.jpg"], "a.jpg"),
        "out under a file": ([manifest, tmp_path / "a.jpg" / "out"], "a.jpg"),
    }[case]
    result = _invoke(*arguments, "--no-progress", "--workers", "0")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and expected in lines[0], result.output
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_fails_in_one_line(tmp_path):
    manifest = _tiny_manifest(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = _invoke(manifest, locked / "out", "--no-progress")
    assert result.exit_code == 2 and result.output.startswith("Error:") and "locked" in result.output


def test_out_dir_of_another_conversion_is_refused(tmp_path):
    manifest = _tiny_manifest(tmp_path)
    out = tmp_path / "out"
    assert _invoke(manifest, out, "--no-progress", "--workers", "0").exit_code == 0
    result = _invoke(manifest, out, "--max-size", "128", "--no-progress", "--workers", "0")
    assert result.exit_code == 2 and "max_size" in result.output


def test_parse_size():
    assert parse_size("500MB") == 500_000_000 and parse_size("1GiB") == 2**30 and parse_size("4096") == 4096
    assert parse_size(None) is None
    with pytest.raises(ValueError, match="not a size"):
        parse_size("5 parsecs")
