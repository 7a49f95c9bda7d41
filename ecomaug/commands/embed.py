"""``ecomaug embed``: embeddings of shards, an items.csv or an image folder, saved with their keys."""

from __future__ import annotations

import click


@click.command("embed")
@click.option("--model", "model_path", type=str, default=None,
              help="Export dir (backbone.safetensors + config.json), run dir, or checkpoint .pt.")
@click.option("--random-init", type=str, default=None, metavar="TIMM_NAME",
              help="Instead of --model: a randomly initialised timm backbone (the baseline).")
@click.option("--data", type=str, required=True,
              help="Shards (dir, manifest.json, .tar, brace pattern, URL), an items.csv, or a "
                   "folder of images.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=str), required=True,
              help="Output .npz: vectors (N x D float32), keys, meta (JSON per row), info.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per forward pass.")
@click.option("--input-size", type=int, default=None,
              help="Crop side for checkpoints / --random-init (exports carry their own; "
                   "default: the run's crop size, or 224).")
@click.option("--loader", type=click.Choice(["builtin", "auto", "dali", "torch"]), default="builtin",
              show_default=True,
              help="builtin: decode with PIL (as ecomaug eval does); auto/dali/torch: "
                   "loaders.build_loader in eval mode (shards only; DALI decodes on the GPU).")
@click.option("--device", type=str, default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --random-init weights.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def embed(model_path: str | None, random_init: str | None, data: str, out: str, batch_size: int,
          input_size: int | None, loader: str, device: str, seed: int, progress: bool) -> None:
    """Embed every image of --data with a trained (or random-init) backbone.

    Rows follow the data's order; keys are the shard keys (or relative paths for a folder) and
    meta holds each sample's metadata (item_id, region, ...). Retrieval normalises the vectors.

    \b
    Examples:
      ecomaug embed --model runs/sample --data ./shards --out emb/sample.npz
      ecomaug embed --model runs/r50/export --data ./shards --out emb.npz --loader auto --batch-size 256
      ecomaug embed --random-init resnet18 --input-size 64 --data ecomaug/assets/sample/items.csv --out emb/random.npz
    """
    from ecomaug.evaluation.embed import embed_data, load_model, random_init_model, resolve_device

    if (model_path is None) == (random_init is None):
        raise ValueError("give exactly one of --model PATH and --random-init TIMM_NAME")
    target = resolve_device(device)
    if random_init is not None:
        model = random_init_model(random_init, device=target, input_size=input_size or 224, seed=seed)
    else:
        model = load_model(model_path, device=target, input_size=input_size)
    embeddings = embed_data(model, data, batch_size=batch_size, loader=loader, progress=progress)
    path = embeddings.save(out)
    click.echo(f"{len(embeddings.keys)} embeddings of size {embeddings.vectors.shape[1]} "
               f"({model.model_name}, {model.input_size} px, {target}) -> {path}")
