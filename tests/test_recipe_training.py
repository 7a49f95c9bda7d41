"""Training takes a team's recipe: file, overrides, own pool and own augmentation; the run records them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ecomaug import engine
from ecomaug.config import load_config, parse_config

EXAMPLE_POOL = Path(__file__).resolve().parents[1] / "docs" / "examples" / "my_marks"
TINY_FLAGS = ["--model", "test_resnet", "--crop-size", "32", "--batch-size", "16", "--queue-size", "16",
              "--momentum", "0.9", "--opt", "adamw", "--base-lr", "0.05", "--warmup-epochs", "0",
              "--weight-decay", "0", "--no-channels-last", "--no-progress", "--backend", "torch",
              "--num-workers", "0", "--hidden-dim", "64", "--dim", "32", "--no-export"]
RECIPE_FILE = """
recipe: ecom
set:
  watermark_p: 1.0
  mosaic_p: 0.0
  watermark_dir: marks
stages:
  - name: gray
    class: kornia.augmentation:RandomGrayscale
    args: {p: 0.5}
    after: colour
"""


def _run(data: Path, out: Path, *flags: str) -> tuple[dict, list[dict]]:
    config = parse_config(["--data", str(data), "--out", str(out), *TINY_FLAGS, "--max-steps", "2",
                           "--log-every", "1", "--checkpoint-every", "1000", *flags])
    engine.train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "config.json").read_text()), [r for r in records if r["event"] == "train"]


@pytest.fixture()
def recipe_dir(tmp_path) -> Path:
    shutil.copytree(EXAMPLE_POOL, tmp_path / "marks")
    (tmp_path / "recipe.yaml").write_text(RECIPE_FILE)
    return tmp_path


def test_file_override_pool_and_custom_stage_change_what_training_draws(sample_shards, recipe_dir, tmp_path):
    data = sample_shards / "shard-000000.tar"
    default_config, default_records = _run(data, tmp_path / "default")
    assert default_config["recipe_spec"]["set"]["watermark_p"] == 0.3
    assert all(record["fired"]["watermark"] < 1.0 for record in default_records)
    assert all(-1.0 <= record["key_cos"] <= 1.0 for record in default_records)  # the collapse monitor

    config, records = _run(data, tmp_path / "mine", "--recipe-config", str(recipe_dir / "recipe.yaml"),
                           "--recipe-set", "flip_p=0.0", "--recipe-set", "gray.p=1.0")
    spec = config["recipe_spec"]
    assert config["recipe_set"] == ["flip_p=0.0", "gray.p=1.0"] and config["recipe"] is None
    assert spec["set"]["watermark_p"] == 1.0 and spec["set"]["flip_p"] == 0.0  # file, then flags
    assert spec["set"]["watermark_dir"] == str((recipe_dir / "marks").resolve())
    assert spec["order"][spec["order"].index("colour") + 1] == "gray"
    assert spec["stages"] == [{"name": "gray", "class": "kornia.augmentation:RandomGrayscale", "args": {"p": 1.0}}]
    for record in records:  # what fired, per logged window: the custom stage ran inside training
        assert record["fired"]["watermark"] == 1.0 and record["fired"]["gray"] == 1.0
        assert record["fired"]["flip"] == 0.0 and record["fired"]["mosaic"] == 0.0
    assert load_config(tmp_path / "mine" / "config.json").recipe_set == ("flip_p=0.0", "gray.p=1.0")


def test_watermark_dir_is_the_only_pool_training_draws_from(sample_shards, tmp_path):
    from ecomaug.engine.setup import build_views

    config = parse_config(["--data", str(sample_shards), "--out", str(tmp_path / "run"), *TINY_FLAGS,
                           "--watermark-dir", str(EXAMPLE_POOL)])
    recipe, _ = build_views(config, device=__import__("torch").device("cpu"), rank=0)
    assert recipe.stages["watermark"].pool.names == ["blue-badge", "ring-logo", "text-kedai-rina"]


def test_resume_refuses_a_changed_recipe_unless_told(sample_shards, tmp_path):
    data, out = sample_shards / "shard-000000.tar", tmp_path / "run"
    _run(data, out, "--recipe-set", "watermark_p=0.5")
    with pytest.raises(ValueError, match=r"recipe differs.*watermark_p: 0.5 -> 0.9.*--allow-recipe-change"):
        _run(data, out, "--recipe-set", "watermark_p=0.9", "--resume", "auto", "--max-steps", "3")
    config, _ = _run(data, out, "--recipe-set", "watermark_p=0.9", "--resume", "auto", "--max-steps", "3",
                     "--allow-recipe-change")
    assert config["recipe_spec"]["set"]["watermark_p"] == 0.9
    _run(data, out, "--recipe-set", "watermark_p=0.9", "--resume", "auto", "--max-steps", "4")  # unchanged: fine


def test_bad_recipe_flags_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="allowed: .*watermark_p"):
        engine.train(parse_config(["--out", str(tmp_path / "run"), *TINY_FLAGS, "--recipe-set", "watermark=1"]))
    assert not (tmp_path / "run").exists()
