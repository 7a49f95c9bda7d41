"""Which stage of a recipe makes a trained run's positives lose to its negatives?

Takes a MoCo v2 run's last checkpoint and, with no training, scores its instance accuracy (the
positive key ranked above every queued key) on the same training images under view variants:
the run's recipe, the recipe with each named stage switched off (``NAME_p=0``), with all of them
off, and ``mocov2`` views. It also reports the mean cosine of query and positive, of query and
its hardest queued key, and the queue's ``key_cos`` (see :meth:`ecomaug.moco.MoCo.health`).
A stage whose removal lifts the accuracy most is the one the model cannot yet be invariant to.

Example::

    python -m bench view-difficulty --run runs/ecom --shards CORPUS/train-shards
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import click
import torch
import torch.nn.functional as F

from bench.harness import BenchCommand, parse_device

DEFAULT_STAGES = ("colour_p", "perspective_p", "mosaic_p", "watermark_p")


def view_variants(recipe: str, recipe_set: Sequence[str],
                  stages: Sequence[str]) -> dict[str, tuple[str | None, list[str]]]:
    """label -> (recipe, ``--recipe-set`` strings): the run's views (recipe None: the run's recipe and
    recipe file, named ``recipe``), each stage off, all of them off, and ``mocov2``."""
    base = list(recipe_set)
    variants: dict[str, tuple[str | None, list[str]]] = {recipe: (None, base)}
    variants.update({f"{recipe}, {stage}=0": (None, [*base, f"{stage}=0"]) for stage in stages})
    if len(stages) > 1:
        variants[f"{recipe}, all of them 0"] = (None, [*base, *(f"{stage}=0" for stage in stages)])
    variants.setdefault("mocov2", ("mocov2", []))
    return variants


@torch.no_grad()
def run(run_dir: Path, shards: str, *, device: torch.device, batches: int = 24,
        stages: Sequence[str] = DEFAULT_STAGES, seed: int = 0) -> dict[str, Any]:
    """Instance accuracy of ``run_dir``'s last checkpoint under each view variant.

    Raises:
        ValueError: no checkpoint in ``run_dir``, a run that is not MoCo v2, or a bad stage option.
    """
    from ecomaug.checkpoint import find_latest_checkpoint
    from ecomaug.config import load_config
    from ecomaug.engine.setup import build_objective
    from ecomaug.moco import info_nce
    from ecomaug.normalise import Normalise
    from ecomaug.recipe_config import resolve_recipe
    from ecomaug.recipes import build_recipe_from_spec
    from loaders.build import build_loader

    config = load_config(run_dir / "config.json")
    found = find_latest_checkpoint(run_dir)
    if found is None:
        raise ValueError(f"{run_dir}: no checkpoint to score")
    if config.objective != "moco" or config.moco_version != "v2":
        raise ValueError(f"{run_dir}: view difficulty needs a MoCo v2 run (a queue), not {config.objective} "
                         f"{config.moco_version}")
    state = found[1]["model"]
    model = build_objective(config, queue_size=state["queue"].shape[1], bn_splits=1)
    model.load_state_dict(state)
    model.to(device).train()  # batch-norm statistics of each batch, as in training (no grad: weights stay)
    loader = build_loader(shards, backend="torch", device=device, batch_size=config.batch_size,
                          crop_size=config.crop_size, seed=seed, num_workers=0)
    views = [batch.views for _, batch in zip(range(batches), loader)]
    normalise = Normalise().to(device)
    rows = []
    run_spec = resolve_recipe(config.recipe, config_file=config.recipe_config, settings=config.recipe_set,
                              watermark_dir=config.watermark_dir)
    for label, (recipe, settings) in view_variants(run_spec.name, config.recipe_set, stages).items():
        if recipe is None:  # the run's recipe, file included, with the variant's settings
            spec = resolve_recipe(config.recipe, config_file=config.recipe_config, settings=settings,
                                  watermark_dir=config.watermark_dir)
        else:
            spec = resolve_recipe(recipe, settings=settings)
        augment = build_recipe_from_spec(spec, generator=torch.Generator(device=device).manual_seed(seed))
        sums = torch.zeros(4)
        for view_q, view_k in views:
            q = F.normalize(model.encoder_q(normalise(augment(view_q))), dim=1)  # N x D
            k = F.normalize(model.encoder_k(normalise(augment(view_k))), dim=1)
            loss, logits = info_nce(q, k, model.queue, model.T)
            sums += torch.stack([(logits.argmax(1) == 0).float().mean(), loss, (q * k).sum(1).mean(),
                                 (q @ model.queue).max(1).values.mean()]).cpu()
        accuracy, loss, positive, hardest = (sums / len(views)).tolist()
        rows.append({"views": label, "accuracy": accuracy, "loss": loss, "positive_cos": positive,
                     "hardest_negative_cos": hardest})
    return {"run": str(run_dir), "step": int(found[1]["step"]), "images": sum(len(v[0]) for v in views),
            "key_cos": model.health()["key_cos"], "rows": rows}


def table(result: dict[str, Any]) -> str:
    """The result as a text table."""
    lines = [f"{result['run']} at step {result['step']}, {result['images']} training images, "
             f"queue key_cos {result['key_cos']:.3f}",
             f"{'views':36s} {'accuracy':>9s} {'loss':>6s} {'cos(q, k+)':>11s} {'cos(q, hardest)':>16s}"]
    lines += [f"{r['views']:36s} {r['accuracy']:9.3f} {r['loss']:6.2f} {r['positive_cos']:11.3f} "
              f"{r['hardest_negative_cos']:16.3f}" for r in result["rows"]]
    return "\n".join(lines)


@click.command("view-difficulty", cls=BenchCommand)
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A MoCo v2 run directory (its config.json and last checkpoint).")
@click.option("--shards", required=True, help="Training shards to draw the views from.")
@click.option("--stages", default=",".join(DEFAULT_STAGES), show_default=True,
              help="Comma-separated probability options to switch off one at a time.")
@click.option("--batches", type=int, default=24, show_default=True)
@click.option("--device", default=None, help="cpu, cuda or cuda:N. Default: cuda when present.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the result to this JSON file.")
def main(run_dir: Path, shards: str, stages: str, batches: int, device: str | None, seed: int,
         out: Path | None) -> None:
    """Instance accuracy of a trained run under its views, each stage off, and mocov2 views.

    \b
    Example:
      python -m bench view-difficulty --run runs/ecom --shards CORPUS/train-shards
    """
    if batches < 1:
        raise click.BadParameter("must be >= 1", param_hint="--batches")
    names = [name.strip() for name in stages.split(",") if name.strip()]
    result = run(run_dir, shards, device=parse_device(device), batches=batches, stages=names, seed=seed)
    click.echo(table(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=2))
        click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
