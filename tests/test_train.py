"""train.py end to end on the bundled sample (tiny timm model, 32-px crops, CPU), and its parts."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from ecomaug import engine
from ecomaug.checkpoint import find_latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from ecomaug.config import PRESETS, TrainConfig, load_config, parse_config
from ecomaug.normalise import Normalise

TINY_FLAGS = ["--model", "test_resnet", "--crop-size", "32", "--batch-size", "16", "--queue-size", "16",
              "--momentum", "0.9", "--opt", "adamw", "--base-lr", "0.05", "--warmup-epochs", "0",
              "--weight-decay", "0", "--no-channels-last", "--no-progress", "--backend", "torch",
              "--num-workers", "0", "--hidden-dim", "64", "--dim", "32"]


def tiny_config(data: Path | str, out: Path, *extra: str) -> TrainConfig:
    return parse_config(["--data", str(data), "--out", str(out), *TINY_FLAGS, *extra])


def train_records(run_dir: Path, event: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["event"] == event]


@pytest.fixture(scope="module")
def trained_run(sample_shards, tmp_path_factory) -> Path:
    """32 MoCo steps over one 64-image shard of the sample (8 epochs: enough to start learning it)."""
    out = tmp_path_factory.mktemp("run")
    config = tiny_config(sample_shards / "shard-000000.tar", out, "--epochs", "8", "--log-every", "4",
                         "--checkpoint-every", "1000", "--val-data", str(sample_shards), "--knn-every", "4")
    result = engine.train(config)
    assert result.step == 32
    return out


def fixed_batch_loss(model, views) -> float:
    """InfoNCE of fixed views with in-batch negatives: comparable across models, unlike the log."""
    import torch.nn.functional as F

    model.train()
    with torch.no_grad():
        q = F.normalize(model.encoder_q(views[0]), dim=1)  # N x D
        k = F.normalize(model.encoder_k(views[1]), dim=1)  # N x D
        return F.cross_entropy(q @ k.T / 0.2, torch.arange(len(q))).item()


def test_loss_falls_on_the_sample(trained_run):
    from ecomaug.recipes import build_recipe
    from loaders.build import build_loader

    losses = [record["loss"] for record in train_records(trained_run)]
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses)
    # Over a few dozen steps the logged MoCo loss stays nearly flat: as the encoder improves, the
    # queue's negatives get harder at the same pace. So compare the initial and the trained model
    # on the same fixed views of the training images instead.
    config = load_config(trained_run / "config.json")
    batch = next(iter(build_loader(config.data, device="cpu", batch_size=32, crop_size=32, mode="eval",
                                   backend="torch", num_workers=0)))
    normalise = Normalise(channels_last=False)
    views = [normalise(build_recipe("mocov2", seed=seed)(batch.views[0])) for seed in (1, 2)]
    initial = engine.build_objective(config, queue_size=16, bn_splits=1)
    trained = engine.build_objective(config, queue_size=16, bn_splits=1)
    trained.load_state_dict(load_checkpoint(list_checkpoints(trained_run)[0][1])["model"])
    before, after = fixed_batch_loss(initial, views), fixed_batch_loss(trained, views)
    assert after < before - 0.1, (before, after, losses)


def test_run_directory_holds_config_metrics_checkpoint_and_export(trained_run):
    config = load_config(trained_run / "config.json")
    assert config.model == "test_resnet" and config.crop_size == 32
    records = train_records(trained_run)
    assert {"loss", "lr", "images_per_s", "data_wait", "m", "accuracy"} <= set(records[0])
    assert 0.0 <= records[0]["data_wait"] <= 1.0
    knn = train_records(trained_run, "knn")
    assert [record["epoch"] for record in knn] == [4, 8]
    assert all(0.0 <= record["recall@1"] <= 1.0 for record in knn)
    (step, path), = list_checkpoints(trained_run)[:1]
    assert step == 32 and path.name == "ckpt-00000032.pt"
    state = load_checkpoint(path)  # weights_only=True inside
    assert state["epoch"] == 8 and state["batch_in_epoch"] == 0
    assert state["model"]["queue"].shape == (32, 16)


def test_exported_weights_load_into_timm(trained_run, tmp_path):
    import timm
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from ecomaug.cli import main as cli

    export = json.loads((trained_run / "export" / "config.json").read_text())
    assert {key: export[key] for key in ("model", "num_features", "input_size", "mean", "std", "interpolation")} \
        == {"model": "test_resnet", "num_features": 96, "input_size": [3, 32, 32],
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}
    weights = load_file(str(trained_run / "export" / "backbone.safetensors"))
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    model.load_state_dict(weights)  # strict
    state = load_checkpoint(list_checkpoints(trained_run)[0][1])
    torch.testing.assert_close(weights["conv1.0.weight"], state["model"]["encoder_q.backbone.conv1.0.weight"])
    assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 96)

    checkpoint = list_checkpoints(trained_run)[0][1]
    result = CliRunner().invoke(cli, ["export", str(checkpoint), "--out", str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    again = load_file(str(tmp_path / "exported" / "backbone.safetensors"))
    assert again.keys() == weights.keys()
    assert all(torch.equal(again[name], weights[name]) for name in weights)
    missing = CliRunner().invoke(cli, ["export", str(tmp_path / "nope.pt"), "--out", str(tmp_path)])
    assert missing.exit_code == 2 and "nope.pt" in missing.output
    larger = CliRunner().invoke(cli, ["export", str(checkpoint), "--out", str(tmp_path / "at48"),
                                      "--input-size", "48"])
    assert larger.exit_code == 0, larger.output  # fed larger than it trained on: recorded, weights the same
    assert json.loads((tmp_path / "at48" / "config.json").read_text())["input_size"] == [3, 48, 48]
    assert load_file(str(tmp_path / "at48" / "backbone.safetensors")).keys() == weights.keys()
    assert json.loads((tmp_path / "at48" / "config.json").read_text())["extra_sizes"] == []
    both = CliRunner().invoke(cli, ["export", str(checkpoint), "--out", str(tmp_path / "both"), "--input-size", "48",
                                    "--multiscale"])
    assert both.exit_code == 0, both.output  # also embedded at the 32 px it trained on
    assert json.loads((tmp_path / "both" / "config.json").read_text())["extra_sizes"] == [32]


def test_the_export_loads_the_timm_way_with_its_real_input_size(trained_run):
    import timm
    from safetensors.torch import load_file

    from ecomaug.evaluation.embed import load_export

    export = trained_run / "export"
    model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    assert model.num_classes == 0
    config = timm.data.resolve_data_config({}, model=model)
    assert tuple(config["input_size"]) == (3, 32, 32) and config["interpolation"] == "bilinear"
    assert config["crop_pct"] == 1.0 and tuple(config["mean"]) == timm.data.IMAGENET_DEFAULT_MEAN
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    ours = load_export(export, device=torch.device("cpu"))
    normalised = (images.float() / 255 - torch.tensor(config["mean"]).view(1, 3, 1, 1)) \
        / torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(normalised), ours.embed(images))
    weights, timm_weights = load_file(str(export / "backbone.safetensors")), load_file(str(export / "model.safetensors"))
    assert all(torch.equal(weights[name], timm_weights[name]) for name in weights)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(sample_shards, tmp_path, monkeypatch):
    import ecomaug.moco

    calls = {"count": 0}
    real_info_nce = ecomaug.moco.info_nce

    def poisoned(q, k, queue, T, same_item=None):
        calls["count"] += 1
        loss, logits = real_info_nce(q, k, queue, T, same_item)
        return (loss * float("nan") if calls["count"] >= 4 else loss), logits

    monkeypatch.setattr(ecomaug.moco, "info_nce", poisoned)
    config = tiny_config(sample_shards / "shard-000000.tar", tmp_path, "--max-steps", "8",
                         "--checkpoint-every", "2", "--log-every", "100", "--no-export")
    with pytest.raises(engine.NonFiniteLossError, match="NaN or infinite.*ckpt-00000002.pt"):
        engine.train(config)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]
    state = load_checkpoint(tmp_path / "checkpoints" / "ckpt-00000002.pt")
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values() if tensor.is_floating_point())


def test_siamese_objective_trains_on_item_ids(sample_shards, tmp_path):
    config = tiny_config(sample_shards / "shard-000000.tar", tmp_path, "--objective", "siamese",
                         "--max-steps", "2", "--log-every", "1", "--no-export")
    result = engine.train(config)
    assert result.step == 2 and all(math.isfinite(r["loss"]) for r in train_records(tmp_path))
    state = load_checkpoint(result.checkpoint)
    assert state["backbone_prefix"] == "encoder.backbone."


def test_config_precedence_and_validation(tmp_path):
    sample = parse_config([])
    assert sample.preset == "sample" and sample.model == PRESETS["sample"]["model"]
    real = parse_config(["--data", "shards", "--preset", "v100x8", "--batch-size", "128"])
    assert (real.model, real.amp, real.batch_size, real.queue_size) == ("resnet50", "fp16", 128, 65536)
    assert parse_config(["--data", "shards"]).model == TrainConfig().model  # no preset: defaults
    assert parse_config(["--data", "x", "--clip-grad", "none"]).clip_grad is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        real.batch_size = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        parse_config(["--data", "x", "--batch-size", "0"])
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig(preset="tpu")
    real.save(tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == real


def test_checkpoints_are_atomic_pruned_and_corruption_tolerant(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"model": {"w": torch.full((2,), float(step))}, "step": step,
                                         "rng": [torch.get_rng_state()]}, keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 3]
    (tmp_path / "checkpoints" / ".ckpt-00000005.pt.abc.tmp").write_bytes(b"half a file")
    (tmp_path / "checkpoints" / "ckpt-00000006.pt").write_bytes(b"truncated by a full disk")
    path, state = find_latest_checkpoint(tmp_path)
    assert path.name == "ckpt-00000004.pt" and state["step"] == 4
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "checkpoints" / "ckpt-00000006.pt")
    assert find_latest_checkpoint(tmp_path / "empty") is None


def test_cli_train_reports_bad_flags_in_one_line(tmp_path):
    from click.testing import CliRunner

    from ecomaug.cli import main as cli

    result = CliRunner().invoke(cli, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                                      "--batch-size", "0"])
    assert result.exit_code == 2 and "Error: --batch-size must be >= 1" in result.output


def test_max_steps_shortens_the_whole_schedule(sample_shards, tmp_path):
    config = tiny_config(sample_shards / "shard-000000.tar", tmp_path / "run", "--epochs", "50",
                         "--max-steps", "6", "--log-every", "1", "--min-lr", "0", "--no-export")
    engine.train(config)
    lrs = [record["lr"] for record in train_records(tmp_path / "run")]
    assert len(lrs) == 6
    assert lrs == sorted(lrs, reverse=True)  # no warm-up asked: the cosine only falls ...
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # ... and ends at min_lr at step 6, not at epoch 50


def test_main_job_holds_out_items_and_closes_with_trained_vs_random_init_recall(tmp_path, capsys):
    import csv

    from loaders.manifest import load_shard_set

    out = tmp_path / "sample-run"
    result = engine.run(["--out", str(out), *TINY_FLAGS, "--epochs", "1", "--max-steps", "2"])
    printed = capsys.readouterr().out
    closing = [line for line in printed.splitlines() if line.startswith("held-out kNN recall@1")]
    assert len(closing) == 1 and "trained" in closing[0] and "random-init" in closing[0]
    held_out = result.held_out
    assert held_out is not None and 0.0 <= held_out["random_init_recall@1"] <= 1.0
    assert f"trained {held_out['trained_recall@1']:.3f}" in closing[0]
    assert held_out["num_queries"] == 80  # 20 held-out items x 4 photos
    items = {}
    for name in ("sample-train.csv", "sample-val.csv"):
        with (out / name).open(newline="") as stream:
            items[name] = {row["item_id"] for row in csv.DictReader(stream)}
    assert len(items["sample-train.csv"]) == 60 and len(items["sample-val.csv"]) == 20
    assert not items["sample-train.csv"] & items["sample-val.csv"]
    assert load_shard_set(out / "shards").num_samples == 240
