"""``ecomaug preview``: draw images next to their two augmented views, labelled with what fired."""

from __future__ import annotations

import click

from ecomaug.limits import MAX_INPUT_SIZE, MAX_PREVIEW_IMAGES, MAX_SEED, MIN_INPUT_SIZE


@click.command("preview")
@click.option("--recipe", type=click.Choice(["ecom", "mocov2"]), default=None,
              help="Augmentation recipe to preview. Default: the --recipe-config file's, else ecom.")
@click.option("--recipe-config", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
              help="Recipe file (YAML or JSON: recipe, set, order, stages), as train.py --recipe-config. "
                   "Its stages import the modules they name and run their code, as a script would: use "
                   "only recipe files you trust (the current folder is not searched for modules).")
@click.option("--shards", type=click.Path(path_type=str), default=None,
              help="Shard directory, manifest.json, .tar or brace pattern to read images from.")
@click.option("--images", type=click.Path(path_type=str), default=None,
              help="Or a folder of plain images (searched recursively).")
@click.option("--out", type=click.Path(path_type=str), required=True, help="Output PNG.")
@click.option("-n", "count", type=click.IntRange(1, MAX_PREVIEW_IMAGES), default=8, show_default=True,
              help="Number of images (rows).")
@click.option("--size", type=click.IntRange(MIN_INPUT_SIZE, MAX_INPUT_SIZE), default=224, show_default=True,
              help="Crop side in pixels.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of the image choice and the views.")
@click.option("--device", type=str, default="cpu", show_default=True, help="Where to augment (cpu, cuda, cuda:1).")
@click.option("--recipe-set", "--set", "settings", multiple=True, metavar="NAME=VALUE",
              help="Override a recipe option, e.g. --recipe-set watermark_p=1.0 (repeatable; wins over the file).")
@click.option("--watermark-dir", type=click.Path(path_type=str), default=None,
              help="Your mark pool (a folder of PNG/JPEG marks), the only pool the overlay draws from.")
def preview(recipe: str | None, recipe_config: str | None, shards: str | None, images: str | None, out: str,
            count: int, size: int, seed: int, device: str, settings: tuple[str, ...],
            watermark_dir: str | None) -> None:
    """Draw N images with two augmented views each into a PNG grid.

    \b
    Examples:
      ecomaug preview --recipe ecom --shards ./shards --out grid.png -n 8 --seed 0
      ecomaug preview --recipe ecom --images ecomaug/assets/sample/images --out grid.png \\
          --recipe-set watermark_p=1.0 --watermark-dir ./my_logos
      ecomaug preview --recipe-config my_recipe.yaml --watermark-dir ./my_logos --shards ./shards --out grid.png

    The same --recipe, --recipe-config, --recipe-set and --watermark-dir as train.py: the grid
    shows what training draws (views of rank 0 with the same --seed).
    """
    from ecomaug.evaluation.embed import resolve_device
    from ecomaug.preview import make_preview
    from ecomaug.recipe_config import resolve_recipe

    target = resolve_device(device)  # a bad name or CUDA without CUDA: one line, before any work
    if target.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: the preview runs on cpu, cuda or cuda:N")
    spec = resolve_recipe(recipe, config_file=recipe_config, settings=settings, watermark_dir=watermark_dir)
    path = make_preview(out, shards=shards, images=images, count=count, size=size, seed=seed,
                        device=str(target), spec=spec)
    click.echo(f"wrote {path}")
