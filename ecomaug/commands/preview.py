"""``ecomaug preview``: draw images next to their two augmented views, labelled with what fired."""

from __future__ import annotations

import ast

import click


def parse_overrides(pairs: tuple[str, ...]) -> dict:
    """``("watermark_p=1.0", "perspective_degrees=(-5, 5)")`` -> ``{"watermark_p": 1.0, ...}``."""
    overrides = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--set expects NAME=VALUE, got {pair!r}")
        try:
            overrides[name.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            overrides[name.strip()] = text.strip()  # a bare word, e.g. a folder path
    return overrides


@click.command("preview")
@click.option("--recipe", type=click.Choice(["ecom", "mocov2"]), default="ecom", show_default=True,
              help="Augmentation recipe to preview.")
@click.option("--shards", type=click.Path(path_type=str), default=None,
              help="Shard directory, manifest.json, .tar or brace pattern to read images from.")
@click.option("--images", type=click.Path(path_type=str), default=None,
              help="Or a folder of plain images (searched recursively).")
@click.option("--out", type=click.Path(path_type=str), required=True, help="Output PNG.")
@click.option("-n", "count", type=int, default=8, show_default=True, help="Number of images (rows).")
@click.option("--size", type=int, default=224, show_default=True, help="Crop side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the image choice and the views.")
@click.option("--device", type=str, default="cpu", show_default=True, help="Where to augment (cpu, cuda, cuda:1).")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE",
              help="Override a recipe option, e.g. --set watermark_p=1.0 (repeatable).")
def preview(recipe: str, shards: str | None, images: str | None, out: str, count: int, size: int, seed: int,
            device: str, settings: tuple[str, ...]) -> None:
    """Draw N images with two augmented views each into a PNG grid.

    \b
    Examples:
      ecomaug preview --recipe ecom --shards ./shards --out grid.png -n 8 --seed 0
      ecomaug preview --recipe ecom --images ecomaug/assets/sample/images --out grid.png \\
          --set watermark_p=1.0 --set watermark_dir=./my_logos
    """
    from ecomaug.evaluation.embed import resolve_device
    from ecomaug.preview import make_preview

    target = resolve_device(device)  # a bad name or CUDA without CUDA: one line, before any work
    if target.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: the preview runs on cpu, cuda or cuda:N")
    path = make_preview(out, recipe=recipe, shards=shards, images=images, count=count, size=size, seed=seed,
                        device=str(target), overrides=parse_overrides(settings))
    click.echo(f"wrote {path}")
