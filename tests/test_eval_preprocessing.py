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
