"""Recipes as a team writes them: a file and NAME=VALUE settings, resolved once, with stages of their own."""

from __future__ import annotations

import json

import pytest
import torch
from kornia.augmentation import IntensityAugmentationBase2D

from ecomaug.augmentation.sampling import GateOnlyGenerator, SeededAugmentation
from ecomaug.recipe_config import parse_settings, recipe_changes, resolve_recipe, spec_from_dict
from ecomaug.recipes import DEFAULT_ORDER, build_recipe, build_recipe_from_spec


class InvertColours(SeededAugmentation, IntensityAugmentationBase2D):
    """A user's own augmentation, following the house's base classes: 1 - x on a seeded gate."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p=p)
        self._param_generator = GateOnlyGenerator()

    def apply_transform(self, input, params, flags, transform=None):
        return 1.0 - input


INVERT = f"{__name__}:InvertColours"


def _images(count: int = 16, size: int = 32) -> torch.Tensor:
    return (torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)


def _write(path, text: str):
    path.write_text(text)
    return path


def test_settings_parse_literals_and_words():
    assert parse_settings(["watermark_p=1.0", "perspective_degrees=(-5, 5)", "watermark_dir=./my logos"]) == {
        "watermark_p": 1.0, "perspective_degrees": (-5, 5), "watermark_dir": "./my logos"}
    with pytest.raises(ValueError, match="--recipe-set expects NAME=VALUE"):
        parse_settings(["watermark_p"], flag="--recipe-set")


def test_file_then_flags_change_what_is_drawn(tmp_path):
    recipe_file = _write(tmp_path / "recipe.yaml", "recipe: ecom\nset:\n  watermark_p: 1.0\n  mosaic_p: 0.0\n"
                                                   "  flip_p: 0.0\n")
    spec = resolve_recipe(config_file=recipe_file, settings=["flip_p=1.0"])
    assert spec.name == "ecom" and spec.options["watermark_p"] == 1.0 and spec.options["flip_p"] == 1.0  # flag wins
    augment = build_recipe_from_spec(spec, seed=0)
    augment(_images())
    rates = augment.fired_rates()
    assert rates["watermark"] == 1.0 and rates["flip"] == 1.0 and rates["mosaic"] == 0.0
    default = build_recipe("ecom", seed=0)
    default(_images())
    assert default.fired_rates()["watermark"] < 1.0
    assert augment.fired_rates() == {}  # read once, then counting starts afresh


def test_order_reorders_and_drops_stages(tmp_path):
    recipe_file = _write(tmp_path / "recipe.json", json.dumps({"order": ["blur", "colour", "flip"]}))
    augment = build_recipe_from_spec(resolve_recipe("ecom", config_file=recipe_file), seed=0)
    assert list(augment.stages) == ["blur", "colour", "flip"]
    augment(_images())
    assert "watermark" not in augment.last_fired


def test_kornia_stage_inserted_after_colour_is_seeded_and_replays(tmp_path):
    recipe_file = _write(tmp_path / "recipe.yaml", """
stages:
  - name: gray
    class: kornia.augmentation:RandomGrayscale
    args: {p: 1.0}
    after: colour
""")
    spec = resolve_recipe(config_file=recipe_file, settings=["grayscale_p=0.0", "blur_p=0.0"])
    assert spec.order == ("perspective", "flip", "colour", "gray", "mosaic", "watermark", "grayscale", "blur")
    global_state = torch.random.get_rng_state()
    first, second = build_recipe_from_spec(spec, seed=4), build_recipe_from_spec(spec, seed=4)
    images = _images()
    view = first(images)
    assert torch.equal(torch.random.get_rng_state(), global_state)  # the global generator is left alone
    assert torch.equal(view, second(images))  # reproducible from the seed
    assert first.last_fired["gray"].all()
    assert torch.equal(first(images, params=first.last_params), view)
    # Grayscale ran after the colour shift: pixels without a later mark or mosaic tile are grey.
    untouched = ~(first.last_fired["watermark"] | first.last_fired["mosaic"])
    grey = (view[untouched].amax(1) - view[untouched].amin(1)).amax()
    assert grey < 1e-5


def test_own_augmentation_class_draws_from_the_recipe_source(tmp_path):
    spec = resolve_recipe("mocov2", config_file=_write(
        tmp_path / "r.yaml", f"stages:\n  - {{name: invert, class: '{INVERT}', args: {{p: 0.5}}, before: flip}}\n"),
        settings=["invert.p=1.0"])
    assert spec.order == (*DEFAULT_ORDER["mocov2"][:-1], "invert", "flip")
    assert spec.custom[0].args == {"p": 1.0}
    augment = build_recipe_from_spec(spec, seed=0)
    assert augment.stages["invert"].source is augment.source
    augment(_images())
    assert augment.fired_rates()["invert"] == 1.0


@pytest.mark.parametrize("stages,match", [
    ("[{name: x, class: 'kornia.augmentation.RandomGrayscale'}]", "module:Class"),
    ("[{name: x, class: 'no_such_module_here:Thing'}]", "cannot import"),
    ("[{name: x, class: 'torch.nn:Linear'}]", "not a Kornia augmentation"),
    ("[{name: x, class: 'kornia.augmentation:RandomGrayscale', after: nowhere}]", "no stage 'nowhere'"),
    ("[{name: blur, class: 'kornia.augmentation:RandomGrayscale'}]", "unique"),
    ("[{name: recolour, class: 'kornia.augmentation:RandomGrayscale'}]", "statistics' names"),
    ("[{name: x, class: 'kornia.augmentation:RandomGrayscale', args: {q: 1}}]", "arguments"),
])
def test_bad_custom_stages_fail_in_one_line(tmp_path, stages, match):
    recipe_file = _write(tmp_path / "r.yaml", f"stages: {stages}\n")
    with pytest.raises(ValueError, match=match):
        build_recipe_from_spec(resolve_recipe(config_file=recipe_file), seed=0)


def test_bad_files_and_settings(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        resolve_recipe(config_file=_write(tmp_path / "a.yaml", "recipes: ecom\n"))
    with pytest.raises(ValueError, match="disagree"):
        resolve_recipe("mocov2", config_file=_write(tmp_path / "b.yaml", "recipe: ecom\n"))
    with pytest.raises(ValueError, match="allowed: .*watermark_p"):
        resolve_recipe("ecom", settings=["watermark_probability=1"])
    with pytest.raises(ValueError, match="unknown stage 'warp'"):
        resolve_recipe(config_file=_write(tmp_path / "c.yaml", "order: [warp]\n"))
    with pytest.raises(ValueError, match="not a custom stage"):
        resolve_recipe("ecom", settings=["gray.p=1"])
    with pytest.raises(ValueError, match="cannot read recipe file"):
        resolve_recipe(config_file=_write(tmp_path / "d.json", "{not json"))
    with pytest.raises(ValueError, match="colour_p"):
        resolve_recipe(config_file=_write(tmp_path / "e.yaml", "set: {colour_p: 2}\n"))


def test_spec_round_trips_through_json_and_names_its_changes(tmp_path):
    (tmp_path / "marks").mkdir()
    spec = resolve_recipe(config_file=_write(tmp_path / "r.yaml", "set: {watermark_dir: marks}\n"))
    assert spec.options["watermark_dir"] == str((tmp_path / "marks").resolve())  # relative to the file
    saved = json.loads(json.dumps(spec.to_dict()))
    assert spec_from_dict(saved) == spec and recipe_changes(saved, spec) == []
    changed = resolve_recipe("ecom", settings={**spec.options, "watermark_p": 0.9})
    assert recipe_changes(saved, changed) == ["watermark_p: 0.3 -> 0.9"]
