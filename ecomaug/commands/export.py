"""``ecomaug export``: a training checkpoint's backbone -> safetensors + config.json for timm."""

from __future__ import annotations

import click


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.option("--out", "out_dir", type=click.Path(path_type=str), required=True,
              help="Directory for backbone.safetensors and config.json.")
def export(checkpoint: str, out_dir: str) -> None:
    """Export the query backbone of CHECKPOINT so timm can load it.

    \b
    Example:
      ecomaug export runs/sample/checkpoints/ckpt-00000060.pt --out runs/sample/export
    \b
    Then, in Python:
      model = timm.create_model(json.load(open("runs/sample/export/config.json"))["model"],
                                pretrained=False, num_classes=0)
      model.load_state_dict(safetensors.torch.load_file("runs/sample/export/backbone.safetensors"))
    """
    from ecomaug.export import export_checkpoint

    written = export_checkpoint(checkpoint, out_dir)
    click.echo(f"exported {checkpoint} -> {written}/backbone.safetensors, {written}/config.json")
