"""The robustness benchmark: does training, and does the ``ecom`` recipe, make matching robust?

Builds the product corpus (``bench.product_corpus``: clip-art items from Debian's
``openclipart-png`` photographed on plain, gradient and photo backgrounds, split into training
images and disjoint evaluation items), trains the same model with each recipe on the same budget
and seed, and scores every model with the evaluation protocol of ``ecomaug eval`` (a clean
gallery of one image per item; every other image of the item as a query, once per disturbance,
the disturbances written apart from the training augmentations), next to a random-init model of
the same architecture and size and a pixel baseline (16 x 16 thumbnails).

    python -m bench.robustness                                   # defaults: the sample preset, 930 steps (~16 min) per recipe on 2 CPU cores
    python -m bench.robustness --max-steps 200 --eval-items 100  # a quick look
    python -m bench.robustness --query-regions none,items        # whole images only, and by the best item region
    python -m bench.robustness --device cuda --train-images 20000 --set crop_size=128 --set epochs=100
    python -m bench.robustness --preset finetune --set model=tf_efficientnet_lite0 --set pretrained=true \
        --query-regions none,items                               # fine-tuned from ImageNet weights vs frozen

Output (``--out``): ``robustness.txt`` (the table), ``robustness.json``, ``robustness.png``,
``training.png`` (loss and instance accuracy of every run) and the runs themselves.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import click
import torch

from bench.harness import BenchCommand
from bench.product_corpus import CorpusSettings, build_corpus

if TYPE_CHECKING:
    from ecomaug.config import TrainConfig

DISTURBED = ("perspective", "watermark", "colour", "multi_item")
DEFAULT_CACHE = Path.home() / ".cache" / "ecomaug" / "robustness-corpus"


def run_config(recipe: str, *, data: Path, val_data: Path, out: Path, device: str, preset: str,
               overrides: Sequence[str], seed: int, progress: bool) -> TrainConfig:
    """The configuration of one recipe's run: the preset, the recipe, then every ``--set NAME=VALUE``.

    It carries ``--overwrite``: a run is either reused whole (:func:`train_run`) or started again.
    """
    from ecomaug.config import parse_config

    argv = ["--data", str(data), "--val-data", str(val_data), "--out", str(out), "--preset", preset,
            "--recipe", recipe, "--device", device, "--seed", str(seed), "--overwrite"]
    for item in overrides:
        name, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"--set expects NAME=VALUE (a train.py flag without --), got {item!r}")
        flag = name.replace("_", "-")
        if value.lower() in ("true", "false"):  # a switch: --pretrained / --no-pretrained
            argv.append(f"--{flag}" if value.lower() == "true" else f"--no-{flag}")
        else:
            argv += [f"--{flag}", value]
    return parse_config(argv + ([] if progress else ["--no-progress"]))


def train_run(config: TrainConfig, *, reuse: bool) -> Path:
    """Train ``config`` (or reuse a finished run in its ``out`` with the same settings); returns its export."""
    from ecomaug.engine import train

    out = config.out_dir
    stamp = out / "bench-settings.json"
    wanted = {key: value for key, value in config.to_dict().items() if key not in ("progress", "overwrite")}
    if reuse and (out / "export" / "backbone.safetensors").is_file() and stamp.is_file():
        if json.loads(stamp.read_text()) == json.loads(json.dumps(wanted)):
            return out / "export"
    started = time.perf_counter()
    result = train(config)
    if result.export_dir is None:
        raise RuntimeError(f"the {config.recipe} run wrote no export")
    stamp.write_text(json.dumps(wanted, indent=1))
    (out / "bench-time.json").write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1)}))
    return result.export_dir


def _row(result: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"model": result.label, "kind": result.info.get("kind", "")}
    for name, summary in result.summaries.items():
        row[f"{name}@1"] = float(summary["recall@1"])
        row[f"{name}@5"] = float(summary["recall@5"])
    for k in (1, 5):
        values = [row[f"{name}@{k}"] for name in DISTURBED if f"{name}@{k}" in row]
        row[f"all_disturbed@{k}"] = sum(values) / len(values) if values else math.nan
    return row


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The table: R@1 / R@5 per disturbance, one line per model."""
    columns = ["clean", *DISTURBED, "all_disturbed"]
    width = max(14, *(len(row["model"]) for row in rows))
    header = f"{'R@1 / R@5':<{width}}  " + "  ".join(f"{name:>13}" for name in columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = [f"{row.get(f'{name}@1', math.nan):.3f} / {row.get(f'{name}@5', math.nan):.3f}" for name in columns]
        lines.append(f"{row['model']:<{width}}  " + "  ".join(f"{cell:>13}" for cell in cells))
    return "\n".join(lines)


def plot_rows(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Grouped bars of R@1 per disturbance, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["clean", *DISTURBED, "all_disturbed"]
    figure, axis = plt.subplots(figsize=(15, 4.5))
    width = 0.8 / len(rows)
    for index, row in enumerate(rows):
        axis.bar([c + index * width for c in range(len(columns))], [row.get(f"{name}@1", 0) for name in columns],
                 width=width, label=row["model"])
    axis.set_xticks([c + 0.4 - width / 2 for c in range(len(columns))], columns)
    axis.set_ylabel("recall@1"), axis.set_ylim(0, 1)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, hiding none
    axis.set_title("item matching on held-out items, per query disturbance")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_training(runs: dict[str, Path], path: Path) -> Path:
    """Loss, instance accuracy and the kNN monitor of every run, from its metrics.jsonl."""
    from bench.curves import plot_training_curves

    series = {}
    for label, run in runs.items():
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        train = [r for r in records if r["event"] == "train"]
        knn = [r for r in records if r["event"] == "knn"]
        series[label] = {"loss": ([r["step"] for r in train], [r["loss"] for r in train]),
                         "accuracy": ([r["step"] for r in train], [r["accuracy"] for r in train]),
                         "recall": ([r["step"] for r in knn], [r["recall@1"] for r in knn])}
    return plot_training_curves(series, path, titles=("InfoNCE loss", "instance accuracy",
                                                       "kNN recall@1 (held-out items)"))


def run_benchmark(*, cache: Path, out: Path, recipes: Sequence[str], settings: CorpusSettings, device: str,
                  preset: str, overrides: Sequence[str], query_regions: Sequence[str], seed: int,
                  reuse: bool, progress: bool, corpus_sources: dict[str, Any] | None = None,
                  train_only: bool = False) -> dict[str, Any]:
    """Corpus -> one run per recipe -> the table of every model (see the module docstring).

    ``train_only`` stops after the runs (to train recipes in parallel processes, then score them
    all with one more call that reuses them)."""
    from ecomaug.evaluation.baselines import tiny_image_model
    from ecomaug.evaluation.embed import iter_data, load_model, random_init_model, resolve_device
    from ecomaug.evaluation.models import pretrained_model
    from ecomaug.evaluation.queries import build_eval_set
    from ecomaug.evaluation.report import ModelSpec, evaluate_models
    from ecomaug.export import export_sides

    if not recipes:
        raise ValueError("--recipes names no recipe; give at least one, e.g. mocov2,ecom")
    corpus = build_corpus(cache, settings, progress=progress, **(corpus_sources or {}))
    target = resolve_device(device)
    configs = {recipe: run_config(recipe, data=corpus["train"], val_data=corpus["eval"], out=out / "runs" / recipe,
                                  device=device, preset=preset, overrides=overrides, seed=seed, progress=progress)
               for recipe in recipes}
    exports = {recipe: train_run(config, reuse=reuse) for recipe, config in configs.items()}
    if train_only:
        return {"table": "", "exports": {recipe: str(path) for recipe, path in exports.items()}}
    # The recipe changes no model or size: every run's config names the same ones. The baselines embed as the
    # exports do (the export's side and its extra sides: like with like).
    first = configs[recipes[0]]
    model_name = first.model
    size, extra = export_sides(first.crop_size, first.export_size, first.export_multiscale)
    specs = [ModelSpec(f"trained, {recipe}", (lambda path=path: load_model(path, device=target)), kind=f"moco/{recipe}")
             for recipe, path in exports.items()]
    if configs[recipes[0]].pretrained:  # what fine-tuning starts from, and must beat, frozen
        specs.append(ModelSpec(f"frozen pretrained {model_name}",
                               lambda: pretrained_model(model_name, device=target, input_size=size, extra_sizes=extra),
                               kind="pretrained"))
    specs.append(ModelSpec(f"random-init {model_name}",
                           lambda: random_init_model(model_name, device=target, input_size=size, seed=seed,
                                                     extra_sizes=extra),
                           kind="random-init"))
    specs.append(ModelSpec("16x16 pixels", lambda: tiny_image_model(device=target, input_size=size),
                           kind="pixels"))
    eval_set = build_eval_set(list(iter_data(corpus["eval"])), seed=seed, progress=progress)
    rows = []
    for regions in query_regions:
        results = evaluate_models(eval_set, specs, batch_size=128, group_by=(), query_regions=regions,
                                  progress=progress)
        for result in results:
            row = _row(result)
            if len(query_regions) > 1:
                row["model"] += f" [{regions}]"
            row["query_regions"] = regions
            rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    table = format_rows(rows)
    times = {recipe: json.loads((out / "runs" / recipe / "bench-time.json").read_text())
             for recipe in recipes if (out / "runs" / recipe / "bench-time.json").is_file()}
    report = {"rows": rows, "corpus": settings.__dict__, "preset": preset, "overrides": list(overrides),
              "model": model_name, "crop_size": first.crop_size, "input_size": size, "extra_sizes": list(extra),
              "device": str(target), "train_seconds": times,
              "queries_per_disturbance": eval_set.protocol["queries_per_disturbance"],
              "gallery_items": eval_set.num_items, "torch_threads": torch.get_num_threads()}
    (out / "robustness.txt").write_text(table + "\n")
    (out / "robustness.json").write_text(json.dumps(report, indent=1))
    plot_rows(rows, out / "robustness.png")
    plot_training({recipe: out / "runs" / recipe for recipe in recipes}, out / "training.png")
    report["table"] = table
    return report


@click.command("robustness", cls=BenchCommand)
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_CACHE, show_default=True,
              help="Where the product corpus and its shards are built (reused when its settings match).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports/robustness"),
              show_default=True, help="Runs, table, JSON and charts.")
@click.option("--recipes", default="mocov2,ecom", show_default=True, help="Comma-separated recipes to train.")
@click.option("--train-images", type=int, default=CorpusSettings.train_images, show_default=True)
@click.option("--eval-items", type=int, default=CorpusSettings.eval_items, show_default=True)
@click.option("--images-per-item", type=int, default=CorpusSettings.images_per_item, show_default=True)
@click.option("--image-size", type=int, default=CorpusSettings.size, show_default=True,
              help="Side of the corpus' listing photos.")
@click.option("--eval-variation", type=click.Choice(["stock", "shops"]), default="stock", show_default=True,
              help="How an item's other photos differ from its gallery photo (see bench.product_corpus).")
@click.option("--train-photos-per-item", type=int, default=1, show_default=True,
              help="Photos of each training item (>1: a listing's several photos, with item_id, for "
                   "--set listing_positives=P).")
@click.option("--preset", default="sample", show_default=True, help="The train.py preset every run starts from.")
@click.option("--max-steps", type=int, default=None, help="Shorter runs (the schedule follows).")
@click.option("--set", "overrides", multiple=True, metavar="NAME=VALUE",
              help="Any train.py flag for every run, e.g. --set crop_size=96 --set model=resnet10t.")
@click.option("--query-regions", default="items", show_default=True,
              help="Query embeddings to score, comma-separated: items (best item region, the default of "
                   "ecomaug eval), none (whole image), grid (best layout cell).")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--reuse/--retrain", default=True, show_default=True, help="Reuse finished runs with the same settings.")
@click.option("--train-only", is_flag=True, help="Train (or reuse) the runs and stop; a later call without it "
              "scores them (train recipes side by side in separate processes, then score once).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def main(cache: Path, out: Path, recipes: str, train_images: int, eval_items: int, images_per_item: int,
         image_size: int, eval_variation: str, train_photos_per_item: int, preset: str, max_steps: int | None,
         overrides: tuple[str, ...], query_regions: str, device: str, seed: int, reuse: bool, train_only: bool,
         progress: bool) -> None:
    """Train each recipe on the product corpus and report recall per disturbance."""
    settings = CorpusSettings(train_images=train_images, eval_items=eval_items, images_per_item=images_per_item,
                              size=image_size, seed=seed, eval_variation=eval_variation,
                              train_photos_per_item=train_photos_per_item)
    if max_steps is not None:
        overrides = (*overrides, f"max_steps={max_steps}")
    regions = [name.strip() for name in query_regions.split(",") if name.strip()]
    report = run_benchmark(cache=cache, out=out, recipes=[r.strip() for r in recipes.split(",") if r.strip()],
                           settings=settings, device=device, preset=preset, overrides=overrides,
                           query_regions=regions, seed=seed, reuse=reuse, progress=progress, train_only=train_only)
    if train_only:
        click.echo(f"trained: {report['exports']}; score them with the same command without --train-only")
        return
    click.echo(report["table"])
    click.echo(f"{report['queries_per_disturbance']} queries per disturbance against {report['gallery_items']} "
               f"clean gallery items; training seconds: {report['train_seconds']}")
    click.echo(f"written: {out / 'robustness.txt'}, {out / 'robustness.json'}, {out / 'robustness.png'}, "
               f"{out / 'training.png'}")


if __name__ == "__main__":
    main()
