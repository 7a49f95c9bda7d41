"""A newcomer's first hour (issue 23, items 3, 4 and 7): small data, a CPU, and what the tools say.

One tiny sample-preset run (test_resnet at 32 px, 4 steps, on 40 photos of 10 items that are
also its held-out set) is shared by the checks of its output, checkpoints and TensorBoard
scalars; its export is what ``ecomaug eval`` is given alone.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ecomaug import engine
from ecomaug.cli import main
from ecomaug.paths import SAMPLE_DIR, SAMPLE_MANIFEST

TINY = ["--model", "test_resnet", "--crop-size", "32", "--batch-size", "16", "--queue-size", "16",
        "--hidden-dim", "64", "--dim", "32", "--backend", "torch", "--num-workers", "0"]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """40 photos of 10 items of the bundled sample, with their item_id: a user's own small data."""
    from loaders.convert import convert_to_shards

    folder = tmp_path_factory.mktemp("small")
    with open(SAMPLE_MANIFEST, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))[:40]
    listing = folder / "items.csv"
    with listing.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "path": str(SAMPLE_MANIFEST.parent / row["path"])} for row in rows)
    convert_to_shards(listing, folder / "shards", shard_size=64, workers=1, progress=False)
    return folder / "shards"


@pytest.fixture(scope="module")
def tiny_run(small_shards, tmp_path_factory) -> tuple[Path, str, engine.TrainResult]:
    """The sample preset on the small shards with --no-progress: (run dir, what it printed, result)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = engine.run(["--preset", "sample", "--data", str(small_shards), "--val-data", str(small_shards),
                             "--out", str(out), *TINY, "--epochs", "2", "--checkpoint-every", "1",
                             "--log-every", "1", "--knn-every", "1", "--no-progress"])
    return out, printed.getvalue(), result


# -- 3: results on a user's own small data ----------------------------------------------------------

def test_the_standard_error_and_the_separation_rule():
    from ecomaug.evaluation.uncertainty import held_out_warning, standard_error

    assert standard_error(0.5, 100) == pytest.approx(0.05)
    assert standard_error(1.0, 5) == 0.0
    with pytest.raises(ValueError, match="num_queries"):
        standard_error(0.5, 0)
    # the case: trained 0.550 vs random init 0.600 on a handful of queries
    warning = held_out_warning(0.55, {"random-init": 0.6}, num_queries=20, num_items=5)
    assert warning is not None and "\n" not in warning
    assert "±" in warning and f"{standard_error(0.55, 20):.3f}" in warning and "random-init 0.600" in warning
    # enough items and queries, and far apart: nothing to say
    assert held_out_warning(0.9, {"random-init": 0.3, "the frozen start": None}, num_queries=400, num_items=100) is None
    # enough queries, but within two standard errors of the baseline
    assert "within 2 standard errors" in held_out_warning(0.51, {"random-init": 0.5}, num_queries=400, num_items=100)


def test_a_tiny_held_out_set_warns_with_a_standard_error(tiny_run):
    out, printed, result = tiny_run
    held_out = result.held_out
    assert held_out["num_queries"] == 40 and held_out["num_items"] == 10
    expected = math.sqrt(held_out["trained_recall@1"] * (1 - held_out["trained_recall@1"]) / 40)
    assert held_out["standard_error"] == pytest.approx(expected)
    closing = [line for line in printed.splitlines() if line.startswith("held-out kNN recall@1")]
    assert len(closing) == 1 and f"± {expected:.3f} (standard error)" in closing[0]
    warnings = [line for line in printed.splitlines() if line.startswith("warning: too few held-out queries")]
    assert len(warnings) == 1 and "40 queries of 10 items" in warnings[0] and f"{expected:.3f}" in warnings[0]
    knn = [line for line in printed.splitlines() if line.startswith("epoch ") and "kNN recall@1" in line]
    assert len(knn) == 2 and all("±" in line for line in knn)


def test_eval_with_only_a_model_adds_the_random_init_baseline_and_the_standard_error(tiny_run, small_shards,
                                                                                       tmp_path):
    out = tiny_run[0]
    common = ["eval", "--gallery", str(small_shards), "--disturbance", "clean", "--batch-size", "32",
              "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(main, [*common, "--model", f"mine={out / 'export'}", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [m["label"] for m in report["models"]] == ["mine", "random-init test_resnet"]
    assert report["models"][1]["kind"] == "random-init" and report["models"][1]["model"] == "test_resnet"
    clean = report["results"]["mine"]["clean"]
    assert clean["recall@1_standard_error"] == pytest.approx(
        math.sqrt(clean["recall@1"] * (1 - clean["recall@1"]) / clean["num_queries"]))
    assert report["warning"].startswith("warning: too few held-out queries")
    assert "standard error" in result.output and report["warning"] in result.output
    quiet = CliRunner().invoke(main, [*common, "--model", f"mine={out / 'export'}", "--no-baselines",
                                      "--out", str(tmp_path / "q")])
    assert quiet.exit_code == 0, quiet.output
    assert [m["label"] for m in json.loads((tmp_path / "q" / "report.json").read_text())["models"]] == ["mine"]


def test_the_default_baselines_add_the_frozen_pretrained_one_where_it_is_here_offline():
    from ecomaug.evaluation.baselines import default_baselines
    from ecomaug.pretrained import packaged_file

    assert default_baselines(["test_resnet", "test_resnet"]) == ([], ["test_resnet"])
    assert default_baselines(["test_resnet"], named_random_init=["test_resnet"]) == ([], [])
    if packaged_file("tf_efficientnet_lite0") is not None:  # the wheel this environment installs
        assert default_baselines(["tf_efficientnet_lite0"]) == (["tf_efficientnet_lite0"], ["tf_efficientnet_lite0"])


# -- 4: the CLI's own example on small data and a CPU -----------------------------------------------

def test_the_default_config_on_small_data_names_the_preset_that_fits_and_its_cost(small_shards, tmp_path):
    result = CliRunner().invoke(main, ["train", "--data", str(small_shards), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    message = result.output.strip()
    assert message.startswith("Error: ") and "\n" not in message
    assert "--preset finetune" in message and "--preset sample" in message
    assert re.search(r"\d+ steps, ~\d+ (s|min) at ~[\d.]+ s a step on one CPU core", message), message
    assert not (tmp_path / "run").exists()


def test_the_default_config_on_a_cpu_warns_with_its_cost_and_the_preset(small_shards, caplog):
    from ecomaug.config import parse_config
    from ecomaug.engine.setup import plan_run
    from loaders.manifest import load_shard_set

    # ResNet-50 (the default) at batch 16 of 448 px: as heavy a step as 64 images at 224 px
    config = parse_config(["--data", str(small_shards), "--batch-size", "16", "--queue-size", "16",
                           "--crop-size", "448"])
    with caplog.at_level(logging.WARNING, logger="ecomaug.engine.setup"):
        plan_run(config, load_shard_set(small_shards), data=small_shards, val_data=None, world_size=1,
                 device=torch.device("cpu"))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "on a CPU" in warnings[0] and "--preset finetune" in warnings[0]
    assert re.search(r"\d+ steps \(~[\d.]+ (s|min) a step on one core", warnings[0]), warnings[0]


def test_the_help_example_trains_with_a_preset_that_fits_small_data():
    from ecomaug.config import parse_config
    from ecomaug.presets import CPU_PRESETS

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    [line] = [line.strip() for line in result.output.splitlines() if line.strip().startswith("ecomaug train")]
    assert parse_config(line.split()[2:]).preset in CPU_PRESETS, line


# -- 7: rough edges ---------------------------------------------------------------------------------

def test_a_folder_of_images_as_data_says_to_convert_it_first(tmp_path):
    photos = tmp_path / "my_photos"
    photos.mkdir()
    for path in sorted((SAMPLE_DIR / "images").glob("*.jpg"))[:2]:
        shutil.copy(path, photos / path.name)
    result = CliRunner().invoke(main, ["train", "--data", str(photos), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "looks like a folder of images" in result.output and f"ecomaug shard {photos} " in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "folder of images" not in CliRunner().invoke(main, ["train", "--data", str(empty)]).output


def test_no_progress_still_prints_a_start_line_and_step_lines(tiny_run):
    printed = tiny_run[1].splitlines()
    assert printed[0].startswith("training 4 steps of test_resnet at 32 px")
    assert [line.split(":")[0] for line in printed if line.startswith("step ")] == [f"step {n}/4" for n in range(1, 5)]


def test_the_sample_preset_keeps_one_checkpoint(tiny_run):
    from ecomaug.presets import PRESETS

    assert PRESETS["sample"]["keep_last"] == 1
    out, _, result = tiny_run
    assert [path.name for path in (out / "checkpoints").glob("ckpt-*.pt")] == ["ckpt-00000004.pt"]
    assert result.checkpoint == out / "checkpoints" / "ckpt-00000004.pt"


def test_train_help_says_each_default_once():
    from ecomaug.config import build_parser

    text = " ".join(build_parser(prog="train.py").format_help().split())
    assert "--num-workers NUM_WORKERS loader workers (default: the loader's choice) --" in text
    assert not re.search(r"\(default: [^()]*\) \(default:", text)


def test_tensorboard_charts_the_fired_shares_and_the_held_out_recall(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, result = tiny_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    fired = {tag for tag in tags if tag.startswith("train/fired/")}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shares = next(record["fired"] for record in records if record["event"] == "train")
    assert fired == {f"train/fired/{name}" for name in shares}
    assert {"held_out/trained_recall@1", "held_out/random_init_recall@1", "held_out/standard_error",
            "knn/standard_error"} <= tags
    [point] = events.Scalars("held_out/trained_recall@1")
    assert point.step == 4 and point.value == pytest.approx(result.held_out["trained_recall@1"])
