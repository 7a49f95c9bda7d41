"""The robustness report on the bundled sample, its disturbances, protocol and commands."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ecomaug.cli import main
from ecomaug.evaluation.disturbances import DISTURBANCES, apply_disturbance, make_rng
from ecomaug.evaluation.embed import load_embeddings, load_model, random_init_model
from ecomaug.evaluation.queries import split_gallery

MODEL, SIZE = "test_resnet", 32  # a tiny timm backbone keeps the report within CI time


def _image(sample_dir, name="images/item003_1.jpg") -> Image.Image:
    return Image.open(sample_dir / name).convert("RGB")


@pytest.mark.parametrize("name", DISTURBANCES)
def test_disturbance_is_seeded_and_changes_the_image(sample_dir, name):
    image = _image(sample_dir)
    others = [_image(sample_dir, f"images/item0{i}_0.jpg") for i in (10, 11, 12, 13, 14)]
    first = apply_disturbance(name, image, make_rng(0, name, "k"), others=others)
    again = apply_disturbance(name, image, make_rng(0, name, "k"), others=others)
    other_seed = apply_disturbance(name, image, make_rng(1, name, "k"), others=others)
    assert first.size == image.size and first.mode == "RGB"
    pixels = np.asarray(first).astype(int)
    assert np.array_equal(pixels, np.asarray(again))
    assert not np.array_equal(pixels, np.asarray(other_seed))
    change = np.abs(pixels - np.asarray(image).astype(int)).max(axis=2)
    changed = (change > 40).mean()  # share of pixels visibly changed
    if name == "clean":
        assert change.mean() > 0 and changed < 0.01  # a re-encode, not a content change
    else:
        assert changed > 0.005


def test_bad_disturbance_input_is_a_clear_error(sample_dir):
    with pytest.raises(ValueError, match="unknown disturbance 'blur'"):
        apply_disturbance("blur", _image(sample_dir), make_rng(0, "blur", "k"))
    with pytest.raises(ValueError, match="another item"):
        apply_disturbance("multi_item", _image(sample_dir), make_rng(0, "multi_item", "k"))


def test_gallery_holds_one_image_per_item_and_queries_the_others():
    samples = [(f"k{i}", {"item_id": f"item{i % 3}"}, b"") for i in range(8)] + \
              [("lonely", {"item_id": "solo"}, b"")]
    gallery, queries = split_gallery(samples)
    assert [key for key, _, _ in gallery] == ["k0", "k1", "k2", "lonely"]  # smallest key per item
    assert sorted(key for key, _, _ in queries) == ["k3", "k4", "k5", "k6", "k7"]
    assert not {k for k, _, _ in gallery} & {k for k, _, _ in queries}
    with pytest.raises(ValueError, match="no item_id"):
        split_gallery([("a", {"region": "SG"}, b"")])
    with pytest.raises(ValueError, match="nothing to query"):
        split_gallery([("a", {"item_id": "1"}, b""), ("b", {"item_id": "2"}, b"")])


@pytest.fixture(scope="module")
def trained_like_runs(tmp_path_factory):
    """A checkpoint run and an export holding the random-init weights of MODEL (seed 0)."""
    from ecomaug.checkpoint import save_checkpoint
    from ecomaug.export import export_backbone

    root = tmp_path_factory.mktemp("runs")
    weights = random_init_model(MODEL, device=torch.device("cpu"), input_size=SIZE).backbone.state_dict()
    save_checkpoint(root / "ckpt_run", 7, {
        "model": {f"encoder_q.backbone.{name}": tensor for name, tensor in weights.items()},
        "step": 7, "config": {"model": MODEL, "crop_size": SIZE, "objective": "moco"}})
    (root / "ckpt_run" / "config.json").write_text(json.dumps({"objective": "moco", "recipe": "ecom"}))
    export_backbone(weights, root / "export_run" / "export", model_name=MODEL, input_size=SIZE)
    return root


def test_checkpoint_export_and_random_init_load_the_same_backbone(trained_like_runs):
    cpu = torch.device("cpu")
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    reference = random_init_model(MODEL, device=cpu, input_size=SIZE).embed(images)
    for source in ("ckpt_run", "ckpt_run/checkpoints/ckpt-00000007.pt", "export_run",
                   "export_run/export"):
        model = load_model(trained_like_runs / source, device=cpu)
        assert model.model_name == MODEL and model.input_size == SIZE
        torch.testing.assert_close(model.embed(images), reference)


def test_eval_report_on_the_sample(sample_shards, trained_like_runs, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(main, [
        "eval", "--gallery", str(sample_shards),
        "--model", f"ckpt={trained_like_runs / 'ckpt_run'}",
        "--random-init", MODEL, "--max-items", "16", "--max-queries-per-item", "2",
        "--batch-size", "32", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "recall@1" in result.output and "independent of the training" in result.output
    report = json.loads((out / "report.json").read_text())
    assert [m["label"] for m in report["models"]] == ["ckpt", f"random-init {MODEL}"]
    assert [m["kind"] for m in report["models"]] == ["moco/ecom", "random-init"]
    assert report["protocol"]["items"] == 16 and report["protocol"]["queries_per_disturbance"] == 32
    assert "independently of the training augmentations" in report["note"]
    for label, by_disturbance in report["results"].items():
        assert list(by_disturbance) == list(DISTURBANCES)
        for summary in by_disturbance.values():
            assert summary["num_queries"] == 32
            assert 0 <= summary["recall@1"] <= summary["recall@5"] <= summary["recall@10"] <= 1
            regions = summary["groups"]["region"]
            assert sum(group["num_queries"] for group in regions.values()) == 32
    # The checkpoint holds the random-init weights: both columns must agree exactly.
    assert report["results"]["ckpt"] == report["results"][f"random-init {MODEL}"]
    # Random features still find an undisturbed item more often than chance (1/16).
    assert report["results"]["ckpt"]["clean"]["recall@5"] > 5 / 16
    assert Image.open(out / "recall.png").size[0] > 400
    page = (out / "examples.html").read_text()
    # 5 disturbances x 3 examples, each: query, expected gallery image, top 5 of 2 models.
    assert page.count('class="hit"') + page.count('class="miss"') == 5 * 3 * 5 * 2
    assert "independently" in page
    assert "multi_item" in (out / "report.txt").read_text()


def test_embed_command_writes_keys_and_meta(sample_shards, trained_like_runs, tmp_path):
    out = tmp_path / "emb.npz"
    first_shard = sample_shards / "shard-000000.tar"  # 64 samples
    result = CliRunner().invoke(main, ["embed", "--model", str(trained_like_runs / "export_run"),
                                       "--data", str(first_shard), "--out", str(out),
                                       "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    embeddings = load_embeddings(out)
    assert embeddings.vectors.shape == (64, 96) and len(set(embeddings.keys)) == 64
    assert all(row["item_id"].startswith("item") for row in embeddings.meta)
    assert embeddings.info["model"] == MODEL


@pytest.mark.parametrize("arguments, message", [
    (["eval", "--gallery", "nowhere", "--random-init", MODEL, "--out", "r"], "nowhere"),
    (["eval", "--gallery", "x", "--out", "r"], "nothing to evaluate"),
    (["eval", "--gallery", "x", "--model", "missing_run", "--out", "r"], "missing_run"),
    (["embed", "--data", "x", "--out", "e.npz"], "exactly one of"),
    (["embed", "--random-init", "no_such_net", "--data", "x", "--out", "e.npz"], "no_such_net"),
])
def test_bad_command_input_is_one_line_and_exit_2(arguments, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, arguments + ["--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") <= 2


def test_the_baselines_embed_as_a_multiscale_export_does(tmp_path):
    """Like with like: a multi-scale export's frozen and random-init baselines get its sides too;
    --input-size alone makes every baseline single-scale at that side."""
    from ecomaug.commands.evaluate import _baseline_plan
    from ecomaug.evaluation.models import load_export
    from ecomaug.evaluation.report import ModelSpec, random_init_spec
    from ecomaug.export import create_backbone, export_backbone

    export = export_backbone(create_backbone("test_resnet"), tmp_path / "export", model_name="test_resnet",
                             input_size=48, extra_sizes=(32,))
    spec = ModelSpec("mine", lambda: load_export(export, device=torch.device("cpu")), kind="trained")
    sides, pretrained, random = _baseline_plan([spec], input_size=None, named_pretrained=(),
                                               named_random_init=("test_resnet",), defaults=False)
    assert sides == (48, (32,)) and pretrained == random == []
    baseline = random_init_spec("test_resnet", device=torch.device("cpu"), input_size=sides[0],
                                extra_sizes=sides[1]).load()
    assert baseline.input_size == 48 and baseline.extra_sizes == (32,)
    assert _baseline_plan([spec], input_size=64, named_pretrained=(), named_random_init=("test_resnet",),
                          defaults=False)[0] == (64, ())
