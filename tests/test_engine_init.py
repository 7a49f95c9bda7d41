"""``--init PATH`` and ``--pretrained``: the run starts from the given weights, or says clearly why not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ecomaug.config import parse_config
from ecomaug.engine import Trainer
from ecomaug.export import create_backbone, export_backbone

TINY = ["--model", "test_resnet", "--crop-size", "32", "--batch-size", "8", "--queue-size", "32",
        "--backend", "torch", "--num-workers", "0", "--hidden-dim", "64", "--dim", "32",
        "--no-channels-last", "--no-progress", "--max-steps", "1", "--no-export"]


def given_backbone() -> torch.nn.Module:
    """A test_resnet whose weights no seeded run would draw (seed 1234, then perturbed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        backbone = create_backbone("test_resnet")
        with torch.no_grad():
            for param in backbone.parameters():
                param.add_(0.01)
    return backbone.eval()


def set_up(data: Path, out: Path, *flags: str) -> Trainer:
    trainer = Trainer(parse_config(["--data", str(data), "--out", str(out), *TINY, *flags]))
    trainer.setup()
    return trainer


def assert_starts_from(trainer: Trainer, reference: torch.nn.Module) -> None:
    """The first step's features (query and key backbone) are those of ``reference``."""
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(images)
        for backbone in (trainer.objective.encoder_q.backbone, trainer.objective.encoder_k.backbone):
            torch.testing.assert_close(backbone.eval()(images), expected)


def test_init_from_a_safetensors_file_sets_query_and_key_backbones(sample_shards, tmp_path):
    from safetensors.torch import save_file

    reference = given_backbone()
    save_file(reference.state_dict(), str(tmp_path / "weights.safetensors"))
    trainer = set_up(sample_shards / "shard-000000.tar", tmp_path / "run", "--init", str(tmp_path / "weights.safetensors"))
    assert_starts_from(trainer, reference)
    trainer.metrics.close()


def test_init_from_a_timm_checkpoint_with_a_classifier_and_a_ddp_prefix(sample_shards, tmp_path):
    import timm

    reference = given_backbone()
    with_head = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    with_head.load_state_dict(reference.state_dict(), strict=False)  # the backbone's weights + a head
    state = {f"module.{name}": value for name, value in with_head.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state, "arch": "test_resnet"}, tmp_path / "model_best.pth.tar")
    trainer = set_up(sample_shards / "shard-000000.tar", tmp_path / "run", "--init", str(tmp_path / "model_best.pth.tar"))
    assert_starts_from(trainer, reference)
    trainer.metrics.close()


def test_init_from_an_export_folder_and_training_moves_on_from_it(sample_shards, tmp_path):
    from ecomaug.engine import train

    reference = given_backbone()
    export_backbone(reference, tmp_path / "export", model_name="test_resnet", input_size=32)
    trainer = set_up(sample_shards / "shard-000000.tar", tmp_path / "run", "--init", str(tmp_path / "export"))
    assert_starts_from(trainer, reference)
    trainer.metrics.close()
    result = train(parse_config(["--data", str(sample_shards / "shard-000000.tar"), "--out", str(tmp_path / "run2"),
                                 *TINY, "--init", str(tmp_path / "export")]))
    assert result.step == 1


def test_weights_of_another_model_are_one_clear_error(sample_shards, tmp_path):
    from safetensors.torch import save_file

    save_file(create_backbone("test_vit").state_dict(), str(tmp_path / "vit.safetensors"))
    with pytest.raises(ValueError, match=r"--init .*vit.safetensors: the weights do not fit this ResNet .*missing"):
        set_up(sample_shards / "shard-000000.tar", tmp_path / "run", "--init", str(tmp_path / "vit.safetensors"))
    wrong_shape = dict(given_backbone().state_dict())
    wrong_shape["conv1.0.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(wrong_shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"conv1.0.weight has shape \(3, 3, 3, 3\)"):
        set_up(sample_shards / "shard-000000.tar", tmp_path / "run3", "--init", str(tmp_path / "shape.safetensors"))


def test_a_missing_init_fails_before_any_work(sample_shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="--init"):
        set_up(sample_shards / "shard-000000.tar", tmp_path / "run", "--init", str(tmp_path / "nope.safetensors"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="give one"):
        parse_config(["--init", "w.safetensors", "--pretrained"])


def test_pretrained_without_the_hub_is_one_line(monkeypatch):
    from ecomaug import pretrained

    monkeypatch.setattr(pretrained, "_cached", lambda name: False)
    monkeypatch.setattr(pretrained, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ValueError, match="not in the local cache and the model hub .* cannot be reached") as error:
        pretrained.pretrained_weights("test_resnet", create_backbone("test_resnet"), img_size=32)
    assert "\n" not in str(error.value) and "--init PATH" in str(error.value)


def test_a_tuple_classifier_is_dropped_head_by_head():
    from ecomaug.engine.initial_weights import fit_to_backbone

    class Distilled(torch.nn.Module):  # the shape of timm's distilled ViTs: two heads, a tuple classifier
        pretrained_cfg = {"classifier": ("head", "head_dist")}

        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Linear(4, 4)

    backbone = Distilled()
    weights = {**backbone.state_dict(), "head.weight": torch.zeros(2, 4), "head_dist.weight": torch.zeros(2, 4)}
    assert set(fit_to_backbone(weights, backbone, where="w.pth")) == {"body.weight", "body.bias"}


def test_a_resumed_run_takes_its_weights_from_the_checkpoint_not_from_init_again(sample_shards, tmp_path):
    from safetensors.torch import save_file

    from ecomaug.engine import train

    init = tmp_path / "weights.safetensors"
    save_file(given_backbone().state_dict(), str(init))
    data, out = sample_shards / "shard-000000.tar", tmp_path / "run"
    train(parse_config(["--data", str(data), "--out", str(out), *TINY, "--init", str(init)]))
    init.unlink()  # moved away since: resuming must not need it
    trainer = set_up(data, out, "--init", str(init), "--resume", "auto", "--max-steps", "2")
    checkpoint = torch.load(sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=False)
    for name, value in trainer.objective.state_dict().items():
        torch.testing.assert_close(value.cpu(), checkpoint["model"][name].cpu())
    trainer.metrics.close()
