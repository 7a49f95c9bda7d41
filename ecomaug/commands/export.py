"""``ecomaug export``: a training checkpoint's backbone -> safetensors + config.json, loadable by timm."""

from __future__ import annotations

import click

from ecomaug.limits import MAX_INPUT_SIZE, MIN_INPUT_SIZE


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.option("--out", "out_dir", type=click.Path(path_type=str), required=True,
              help="Directory for backbone.safetensors (and model.safetensors, timm's name) and config.json.")
@click.option("--input-size", type=click.IntRange(MIN_INPUT_SIZE, MAX_INPUT_SIZE), default=None,
              help="Side of the square input the export records (what embed, eval and match feed it) "
                   "[default: the run's --export-size, else its --crop-size].")
@click.option("--multiscale/--single-scale", default=None,
              help="Also embed at the run's --crop-size where the input size differs, averaging the two "
                   "L2-normalised descriptors [default: the run's --export-multiscale].")
def export(checkpoint: str, out_dir: str, input_size: int | None, multiscale: bool | None) -> None:
    """Export the query backbone of CHECKPOINT so timm can load it.

    \b
    Example:
      ecomaug export runs/sample/checkpoints/ckpt-00000060.pt --out runs/sample/export
    \b
    Then, in Python (input size, mean/std and interpolation come with it):
      model = timm.create_model("local-dir:runs/sample/export", pretrained=True)
      preprocessing = timm.data.resolve_data_config({}, model=model)
    """
    from ecomaug.export import export_checkpoint

    written = export_checkpoint(checkpoint, out_dir, input_size=input_size, multiscale=multiscale)
    click.echo(f"exported {checkpoint} -> {written}/backbone.safetensors, {written}/config.json "
               f"(timm: local-dir:{written})")
