"""bench.view_difficulty scores a trained run's instance accuracy under its views, each stage off, and mocov2's."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from bench.view_difficulty import main, run, view_variants
from ecomaug import engine
from ecomaug.config import parse_config

TINY = ["--model", "test_resnet", "--crop-size", "32", "--batch-size", "16", "--queue-size", "32",
        "--no-channels-last", "--no-progress", "--backend", "torch", "--num-workers", "0", "--hidden-dim", "64",
        "--dim", "32", "--no-export", "--max-steps", "2", "--recipe", "ecom", "--recipe-set", "flip_p=0.0"]


def test_variants_switch_each_stage_off_then_all_and_add_mocov2():
    variants = view_variants("ecom", ["flip_p=0.0"], ["colour_p", "mosaic_p"])
    assert variants == {"ecom": (None, ["flip_p=0.0"]),  # None: the run's own recipe (and recipe file)
                        "ecom, colour_p=0": (None, ["flip_p=0.0", "colour_p=0"]),
                        "ecom, mosaic_p=0": (None, ["flip_p=0.0", "mosaic_p=0"]),
                        "ecom, all of them 0": (None, ["flip_p=0.0", "colour_p=0", "mosaic_p=0"]),
                        "mocov2": ("mocov2", [])}


def test_a_trained_run_is_scored_under_every_variant(sample_shards, tmp_path):
    out = tmp_path / "run"
    engine.train(parse_config(["--data", str(sample_shards), "--out", str(out), *TINY]))
    result = run(out, str(sample_shards), device=torch.device("cpu"), batches=2, stages=["colour_p"])
    assert [row["views"] for row in result["rows"]] == ["ecom", "ecom, colour_p=0", "mocov2"]
    assert result["step"] == 2 and result["images"] == 32 and -1.0 <= result["key_cos"] <= 1.0
    for row in result["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["loss"] > 0
        assert -1.0 <= row["positive_cos"] <= 1.0 and -1.0 <= row["hardest_negative_cos"] <= 1.0
    cli = CliRunner().invoke(main, ["--run", str(out), "--shards", str(sample_shards), "--batches", "1",
                                    "--stages", "watermark_p", "--out", str(tmp_path / "r.json")])
    assert cli.exit_code == 0, cli.output
    assert "ecom, watermark_p=0" in cli.output
    assert len(json.loads((tmp_path / "r.json").read_text())["rows"]) == 3


def test_a_folder_without_a_checkpoint_is_one_error_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"recipe": "ecom"}))
    cli = CliRunner().invoke(main, ["--run", str(tmp_path), "--shards", str(tmp_path)])
    assert cli.exit_code == 2 and "no checkpoint to score" in cli.output and cli.output.count("\n") == 1
