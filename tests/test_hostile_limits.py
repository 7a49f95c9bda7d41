"""Numbers out of range: every command refuses them in one ``Error:`` line, exit 2, before any work.

An ``--input-size`` of 100000 (30 GB for one batch), a ``--top-k`` of 10^9 (96 GB of padding), a
negative ``--exact-limit``, ``--input-size 0`` (silently the default before), ``eval --model =PATH``,
``shard --min-size 500 --max-size 64`` (every image skipped, exit 0 before), and the numbers of
``train``. The paths given do not exist: the range check must come first. And an image whose
shorter side falls below ``--min-size`` only after the resize to ``--max-size`` (a 12000x40 strip,
stored as 128x1 before) is skipped with a reason.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from ecomaug.cli import main

MISSING = "/nonexistent/ecomaug-limits"
NPZ = f"{MISSING}/a.npz"

# (argv, what the one line must say)
CASES: list[tuple[list[str], str]] = [
    (["match", "--a", NPZ, "--b", NPZ, "--out", "{out}", "--top-k", "1000000000"], "'--top-k': 1000000000 is not in"),
    (["match", "--a", NPZ, "--b", NPZ, "--out", "{out}", "--exact-limit", "-1"], "'--exact-limit': -1 is not in"),
    (["match", "--a", NPZ, "--b", NPZ, "--out", "{out}", "--precision", "nan"], "'--precision': 'nan' is not a number"),
    (["match", "--a", NPZ, "--b", NPZ, "--out", "{out}", "--rerank", "-1"], "'--rerank'"),
    (["match", "--a", NPZ, "--b", NPZ, "--out", "{out}", "--input-size", "0"], "'--input-size': 0 is not in"),
    (["embed", "--random-init", "test_resnet", "--data", MISSING, "--out", "{out}.npz", "--input-size", "100000"],
     "'--input-size': 100000 is not in the range 16<=x<=1024"),
    (["embed", "--random-init", "test_resnet", "--data", MISSING, "--out", "{out}.npz", "--input-size", "0"],
     "'--input-size': 0 is not in"),
    (["embed", "--random-init", "test_resnet", "--data", MISSING, "--out", "{out}.npz", "--batch-size", "0"],
     "'--batch-size': 0"),
    (["embed", "--random-init", "test_resnet", "--data", MISSING, "--out", "{out}", "--world-size", "0"],
     "'--world-size': 0"),
    (["embed", "--random-init", "test_resnet", "--data", MISSING, "--out", "{out}.npz", "--seed", "-1"],
     "'--seed': -1"),
    (["eval", "--gallery", MISSING, "--out", "{out}", "--model", f"={MISSING}"], "'--model': '=/nonexistent"),
    (["eval", "--gallery", MISSING, "--out", "{out}", "--model", "label="], "'--model': 'label='"),
    (["eval", "--gallery", MISSING, "--random-init", "test_resnet", "--out", "{out}", "--input-size", "100000"],
     "'--input-size': 100000"),
    (["eval", "--gallery", MISSING, "--random-init", "test_resnet", "--out", "{out}", "--max-items", "0"],
     "'--max-items': 0"),
    (["preview", "--images", MISSING, "--out", "{out}.png", "-n", "1000000000"], "'-n': 1000000000"),
    (["preview", "--images", MISSING, "--out", "{out}.png", "--size", "100000"], "'--size': 100000"),
    (["shard", MISSING, "{out}", "--quality", "0"], "'--quality': 0"),
    (["shard", MISSING, "{out}", "--val-split", "nan"], "'--val-split': 'nan' is not a number"),
    (["shard", MISSING, "{out}", "--workers", "100000"], "'--workers': 100000"),
    (["shard", MISSING, "{out}", "--max-size", "0"], "'--max-size': 0"),
    (["dewatermark", MISSING, "{out}", "--marks", MISSING, "--max-scale", "1e300"], "'--max-scale': 1e+300"),
    (["dewatermark", MISSING, "{out}", "--marks", MISSING, "--threshold", "nan"], "'--threshold': 'nan'"),
    (["train", "--data", MISSING, "--out", "{out}", "--crop-size", "100000"], "--crop-size must be in 16..1024"),
    (["train", "--data", MISSING, "--out", "{out}", "--queue-size", "1000000000"], "--queue-size must be in"),
    (["train", "--data", MISSING, "--out", "{out}", "--seed", "-1"], "--seed must be in 0.."),
    (["train", "--data", MISSING, "--out", "{out}", "--num-workers", "-3"], "--num-workers must be in 0.."),
]


def assert_one_error_line(result, says: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert says in lines[0], lines[0]


@pytest.mark.parametrize("argv, says", CASES, ids=[" ".join(argv[:1] + argv[-2:]) for argv, _ in CASES])
def test_a_number_out_of_range_is_one_line_before_any_work(argv, says, tmp_path):
    out = str(tmp_path / "out")
    result = CliRunner().invoke(main, [part.replace("{out}", out) for part in argv])
    assert_one_error_line(result, says)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the output folder


def test_min_size_above_max_size_is_refused_up_front(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (600, 600), (90, 30, 30)).save(tmp_path / "images" / "a.jpg")
    result = CliRunner().invoke(main, ["shard", str(tmp_path / "images"), str(tmp_path / "out"),
                                       "--min-size", "500", "--max-size", "64", "--no-progress"])
    assert_one_error_line(result, "min_size 500 is larger than max_size 64")
    assert not (tmp_path / "out").exists()


def test_an_image_too_small_after_the_resize_is_skipped_with_a_reason(tmp_path):
    from loaders.convert import convert_to_shards

    (tmp_path / "images").mkdir()
    Image.new("RGB", (12000, 40), (200, 10, 10)).save(tmp_path / "images" / "strip.png")
    Image.new("RGB", (300, 200), (10, 200, 10)).save(tmp_path / "images" / "fine.png")
    report = convert_to_shards(tmp_path / "images", tmp_path / "out", max_size=128, workers=0, progress=False)
    assert (report.written, report.skipped_by_reason) == (1, {"too small": 1})
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert skipped[0]["source"] == "strip.png" and "12000x40 would be 128x1" in skipped[0]["detail"]


def test_input_size_is_checked_by_the_library_too():
    import torch

    from ecomaug.evaluation.models import random_init_model

    for size in (0, 100000, True):
        with pytest.raises(ValueError, match="must be an integer in 16..1024"):
            random_init_model("test_resnet", device=torch.device("cpu"), input_size=size)


@pytest.mark.parametrize("flags, says", [(["--crop-size", "4"], "--crop-size must be in 16..1024"),
                                         (["--batch-size", "100000000"], "--batch-size must be in 1..4096"),
                                         (["--sgd-momentum", "5"], "--sgd-momentum must be in 0.0..1.0")])
def test_train_config_ranges(flags, says):
    from ecomaug.config import parse_config

    with pytest.raises(ValueError, match=says):
        parse_config(["--data", MISSING, *flags])


def test_the_preset_values_are_inside_the_ranges():
    from ecomaug.config import PRESETS, resolve_config

    for name in PRESETS:  # raises if a preset's value is out of range
        assert resolve_config({"preset": name, "data": MISSING}).preset == name
