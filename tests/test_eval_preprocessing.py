"""One evaluation preprocessing: ``embed.prepare`` = the loaders' eval mode = what the export says,
and one normalisation (timm's constants) in training, evaluation and the export."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image


def test_prepare_equals_the_torch_loaders_eval_crop_on_the_sample(sample_shards):
    from ecomaug.evaluation.embed import prepare
    from loaders.build import build_loader
    from loaders.torch_backend import shard_samples

    size = 128  # the sample's 256-px JPEGs are then decoded whole, as prepare decodes them
    batch = next(iter(build_loader(sample_shards, backend="torch", device="cpu", batch_size=8, crop_size=size,
                                   mode="eval", num_workers=0)))
    samples = {}
    for url in sorted(str(path) for path in sample_shards.glob("*.tar")):
        for sample in shard_samples(url):
            samples[sample["__key__"]] = sample
    for key, view in zip(batch.keys, batch.views[0]):
        data = next(value for name, value in samples[key].items() if name in ("jpg", "jpeg", "png", "webp"))
        torch.testing.assert_close(prepare(data, size), view, atol=0, rtol=0)


def test_prepare_cuts_the_centre_square_of_a_wide_image_like_the_loader():
    from ecomaug.evaluation.embed import prepare
    from loaders.torch_backend import centre_box, decode_views

    pixels = np.random.default_rng(0).integers(0, 256, (90, 171, 3), dtype=np.uint8)
    stream = io.BytesIO()
    Image.fromarray(pixels).save(stream, format="PNG")
    loader_view = decode_views(stream.getvalue(), 48, lambda width, height: [centre_box(width, height)])[0]
    ours = prepare(stream.getvalue(), 48)
    assert ours.shape == (3, 48, 48)
    torch.testing.assert_close(ours, torch.from_numpy(loader_view).permute(2, 0, 1), atol=0, rtol=0)


def test_export_config_normalisation_and_training_agree(tmp_path):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from ecomaug.evaluation.embed import EmbeddingModel, load_export
    from ecomaug.export import create_backbone, export_backbone
    from ecomaug.normalise import EVAL_INTERPOLATION, Normalise

    export = export_backbone(create_backbone("test_resnet"), tmp_path / "export", model_name="test_resnet",
                             input_size=32)
    config = json.loads((export / "config.json").read_text())
    assert config["interpolation"] == EVAL_INTERPOLATION == "bilinear"
    assert tuple(config["mean"]) == IMAGENET_DEFAULT_MEAN and tuple(config["std"]) == IMAGENET_DEFAULT_STD
    model = load_export(export, device=torch.device("cpu"))
    assert isinstance(model, EmbeddingModel) and model.mean == IMAGENET_DEFAULT_MEAN
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        as_trained = model.backbone(Normalise()(images.float() / 255))
    torch.testing.assert_close(model.embed(images), as_trained)


def test_a_multiscale_export_embeds_the_mean_of_its_sides_normalised_descriptors(tmp_path):
    """``extra_sizes`` travel in config.json; embed then averages the L2-normalised features of the crop
    and of the crop resized to each extra side, and a single-scale export keeps its raw features."""
    from ecomaug.evaluation.embed import load_export
    from ecomaug.export import create_backbone, export_backbone, export_sides
    from ecomaug.normalise import Normalise

    torch.manual_seed(0)
    backbone = create_backbone("test_resnet")
    export = export_backbone(backbone, tmp_path / "export", model_name="test_resnet", input_size=48,
                             extra_sizes=(32,))
    assert json.loads((export / "config.json").read_text())["extra_sizes"] == [32]
    model = load_export(export, device=torch.device("cpu"))
    assert model.extra_sizes == (32,) and model.info()["extra_sizes"] == [32]
    images = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    x = Normalise()(images.float() / 255)
    smaller = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        expected = (torch.nn.functional.normalize(model.backbone(x), dim=-1)
                    + torch.nn.functional.normalize(model.backbone(smaller), dim=-1)) / 2
        single = load_export(export_backbone(backbone, tmp_path / "single", model_name="test_resnet", input_size=48),
                             device=torch.device("cpu"))
        raw = single.backbone(x)
    torch.testing.assert_close(model.embed(images), expected)
    torch.testing.assert_close(single.embed(images), raw)  # no extra sides: the backbone's features as they are
    assert single.extra_sizes == () and "extra_sizes" not in single.info()
    # the run's rule: the training crop side is the extra side only where the export's side differs
    assert export_sides(128, 224, True) == (224, (128,))
    assert export_sides(128, 224, False) == (224, ())
    assert export_sides(128, None, True) == (128, ())
    assert export_sides(128, 224, True, input_size=160) == (160, (128,))
