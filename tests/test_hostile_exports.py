"""Untrusted export folders and embeddings: every corruption is one ``Error:`` line and exit 2.

A real export of ``test_resnet`` is written once with :func:`ecomaug.export.export_backbone`, then
copied and broken one way per case (a tensor of the wrong shape, an extra key, a config naming
another model, a corrupt safetensors header, a two-value mean, a 100000-pixel input size, NaN
weights, ...). ``ecomaug embed --model`` and ``ecomaug train --init`` must refuse each in one line
before any work; an ``.npz`` of NaN vectors must not reach ``ecomaug match``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ecomaug.cli import main
from ecomaug.export import create_backbone, export_backbone
from ecomaug.paths import SAMPLE_DIR

TINY = ["--model", "test_resnet", "--crop-size", "32", "--batch-size", "8", "--queue-size", "32",
        "--backend", "torch", "--num-workers", "0", "--hidden-dim", "64", "--dim", "32",
        "--no-channels-last", "--no-progress", "--max-steps", "1", "--no-export"]


@pytest.fixture(scope="module")
def good_export(tmp_path_factory) -> Path:
    """A sound export of a seeded test_resnet at 32 px."""
    out = tmp_path_factory.mktemp("export") / "good"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = create_backbone("test_resnet")
    export_backbone(backbone, out, model_name="test_resnet", input_size=32)
    return out


def sample_images(folder: Path, count: int) -> Path:
    """The first ``count`` photos of the bundled sample, copied into ``folder``."""
    for path in sorted((SAMPLE_DIR / "images").glob("*.jpg"))[:count]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return sample_images(tmp_path_factory.mktemp("images"), 2)


@pytest.fixture(scope="module")
def tiny_shard(tmp_path_factory) -> Path:
    """One shard of 16 sample images (enough for a batch of 8)."""
    from loaders.convert import convert_to_shards

    folder = sample_images(tmp_path_factory.mktemp("tiny_images"), 16)
    out = tmp_path_factory.mktemp("tiny_shards")
    convert_to_shards(folder, out, shard_size=64, workers=1, progress=False)
    return out / "shard-000000.tar"


def _weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        state = load_file(str(folder / "backbone.safetensors"))
        change(state)
        save_file(state, str(folder / "backbone.safetensors"))
    return apply


def _config(**fields) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(fields)
        (folder / "config.json").write_text(json.dumps(config))
    return apply


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


def _nan(state: dict[str, torch.Tensor]) -> None:
    state["conv1.0.weight"] = state["conv1.0.weight"].clone()
    state["conv1.0.weight"].view(-1)[3] = float("nan")


def _inf_buffer(state: dict[str, torch.Tensor]) -> None:
    state["bn1.running_var"] = state["bn1.running_var"].clone()
    state["bn1.running_var"][0] = float("inf")


# name -> (how the export is broken, what the one line must say)
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "wrong-shape": (_weights(lambda s: s.update({"conv1.0.weight": torch.zeros(3, 3, 3, 3)})),
                    "conv1.0.weight has shape (3, 3, 3, 3)"),
    "extra-key": (_weights(lambda s: s.update({"bogus.weight": torch.zeros(3)})), "unexpected e.g. 'bogus.weight'"),
    "missing-key": (_weights(lambda s: s.pop("conv1.0.weight")), "missing e.g."),
    "nan-weights": (_weights(_nan), "conv1.0.weight holds 1 NaN/inf values"),
    "inf-buffer": (_weights(_inf_buffer), "bn1.running_var holds 1 NaN/inf values"),
    "integer-weights": (_weights(lambda s: s.update({"conv1.0.weight": s["conv1.0.weight"].long()})),
                        "conv1.0.weight holds torch.int64 values"),
    "another-model": (_config(model="resnet18", num_features=512), "the weights do not fit"),
    "unknown-model": (_config(model="resnet5000"), "config.json: model: unknown timm model 'resnet5000'"),
    "model-not-a-name": (_config(model=5), "config.json: model must name a timm model, got 5"),
    "corrupt-header": (_write("backbone.safetensors", b"\xff" * 8 + b"garbage"), "not a readable safetensors file"),
    "truncated-weights": (lambda folder: (folder / "backbone.safetensors").write_bytes(
        (folder / "backbone.safetensors").read_bytes()[:5000]), "not a readable safetensors file"),
    "mean-of-two": (_config(mean=[0.5, 0.5]), "config.json: mean must be three finite numbers"),
    "huge-input-size": (_config(input_size=[3, 100000, 100000]),
                        "config.json: input_size must be an integer in 16..1024"),
    "zero-input-size": (_config(input_size=0), "input_size must be an integer in 16..1024 (pixels), got 0"),
    "oblong-input-size": (_config(input_size=[3, 32, 64]), "input_size must be S or [3, S, S]"),
    "bad-interpolation": (_config(interpolation="sinc"), "interpolation must be one of"),
    "huge-extra-size": (_config(extra_sizes=[5000]), "config.json: extra_sizes must be an integer in 16..1024"),
    "extra-sizes-a-number": (_config(extra_sizes=64), "config.json: extra_sizes must be a list of at most 3 sides"),
    "repeated-extra-size": (_config(extra_sizes=[64, 64]), "config.json: extra_sizes repeats a side"),
    "config-not-json": (_write("config.json", b"{not json"), "config.json: not a JSON export config"),
    "config-a-list": (_write("config.json", b"[1, 2]"), "expected a JSON object"),
}


def broken_export(good: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(good, folder)
    (folder / "model.safetensors").unlink()  # the hard link would carry the change back to `good`
    CORRUPTIONS[name][0](folder)
    return folder


def assert_one_error_line(result, says: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert says in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_a_sound_export_embeds(good_export, images, tmp_path):
    result = CliRunner().invoke(main, ["embed", "--model", str(good_export), "--data", str(images),
                                       "--out", str(tmp_path / "e.npz"), "--no-progress"])
    assert result.exit_code == 0, result.output
    from ecomaug.evaluation.embeddings import load_embeddings

    assert torch.isfinite(load_embeddings(tmp_path / "e.npz").vectors).all()


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_embed_refuses_a_broken_export_in_one_line(name, good_export, images, tmp_path):
    folder = broken_export(good_export, tmp_path, name)
    result = CliRunner().invoke(main, ["embed", "--model", str(folder), "--data", str(images),
                                       "--out", str(tmp_path / "e.npz"), "--no-progress"])
    assert_one_error_line(result, CORRUPTIONS[name][1])
    assert str(folder) in result.stderr  # the message names the folder's file
    assert not (tmp_path / "e.npz").exists()


@pytest.mark.parametrize("name", ["corrupt-header", "nan-weights", "wrong-shape", "mean-of-two", "unknown-model"])
def test_train_init_refuses_a_broken_export_folder_in_one_line(name, good_export, tiny_shard, tmp_path):
    folder = broken_export(good_export, tmp_path, name)
    result = CliRunner().invoke(main, ["train", "--data", str(tiny_shard), "--out", str(tmp_path / "run"),
                                       *TINY, "--init", str(folder)])
    assert_one_error_line(result, CORRUPTIONS[name][1])
    assert "--init" in result.stderr or str(folder) in result.stderr


def test_init_refuses_a_safetensors_file_of_nan_weights(tmp_path, tiny_shard):
    state = create_backbone("test_resnet").state_dict()
    _nan(state)
    save_file(state, str(tmp_path / "nan.safetensors"))
    result = CliRunner().invoke(main, ["train", "--data", str(tiny_shard), "--out", str(tmp_path / "run"),
                                       *TINY, "--init", str(tmp_path / "nan.safetensors")])
    assert_one_error_line(result, "--init ")
    assert "NaN/inf" in result.stderr


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_match_refuses_embeddings_holding_nan_or_inf(bad, tmp_path):
    from ecomaug.evaluation.embeddings import Embeddings

    vectors = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    keys, meta = [f"k{i}" for i in range(4)], [{"item_id": str(i)} for i in range(4)]
    Embeddings(vectors=vectors, keys=keys, meta=meta).save(tmp_path / "a.npz")
    vectors[2, 5] = bad
    Embeddings(vectors=vectors, keys=keys, meta=meta).save(tmp_path / "b.npz")
    result = CliRunner().invoke(main, ["match", "--a", str(tmp_path / "a.npz"), "--b", str(tmp_path / "b.npz"),
                                       "--out", str(tmp_path / "match"), "--no-progress", "--no-report"])
    assert_one_error_line(result, "b.npz: 1 of 4 vectors hold NaN/inf values (e.g. key 'k2')")
