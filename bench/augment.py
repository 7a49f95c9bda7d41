"""What the augmentations cost: the ``ecom`` recipe's images/s, and its share of a MoCo training step.

    python -m bench augment --device cpu --batch-size 256 --size 224
    python -m bench augment --device cuda --batch-size 256 --size 224 --out bench-augment.json

Both views of a batch go through the recipe (two calls, fresh parameters each), and in the same run
a ResNet-50 (timm, ``pretrained=False``) takes a MoCo-style step on two views of the same size:
forward of both views, an InfoNCE loss between them, backward and an SGD update (under bfloat16
autocast on CUDA). The issue's goal on GPU: the recipe costs at most 15 % of that step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch
import torch.nn.functional as F

from bench.harness import BenchCommand, parse_device
from bench.timing import conditions, measure


def synthetic_batch(batch_size: int, size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 images (N, 3, S, S): the recipe's cost does not depend on the content."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, 3, 8, 8, generator=generator)
    images = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (images * 255).round().to(torch.uint8).to(device)


def moco_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, views: tuple[torch.Tensor, torch.Tensor],
              device: torch.device, temperature: float = 0.2) -> None:
    """One forward (both views) + InfoNCE + backward + update, bf16 autocast on CUDA."""
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        query = F.normalize(model(views[0]), dim=1)  # (N, D)
        key = F.normalize(model(views[1]), dim=1)  # (N, D)
        logits = query @ key.T / temperature  # (N, N): positives on the diagonal
        loss = F.cross_entropy(logits.float(), torch.arange(len(logits), device=device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def run(device: torch.device, batch_size: int, size: int, *, recipe: str = "ecom", model_name: str = "resnet50",
        warmup: int = 2, repeats: int = 5, seed: int = 0, skip_step: bool = False,
        step_batch_size: int | None = None) -> dict[str, Any]:
    """Measure the recipe on two views and (unless ``skip_step``) the model step; return the figures.

    ``step_batch_size`` (default: ``batch_size`` on CUDA, at most 32 on CPU, where a ResNet-50 step
    on 2 x 256 images needs ~50 GB of activations) is the batch of the step; the recipe's cost is
    compared with the step per image.
    """
    import timm

    import ecomaug

    if batch_size < 1 or size < 16:
        raise ValueError(f"need --batch-size >= 1 and --size >= 16, got {batch_size} and {size}")
    if step_batch_size is None:
        step_batch_size = batch_size if device.type == "cuda" else min(batch_size, 32)
    if not 1 <= step_batch_size <= batch_size:
        raise ValueError(f"--step-batch-size must be in 1..{batch_size}, got {step_batch_size}")
    images = synthetic_batch(batch_size, size, device, seed)
    augment = ecomaug.build_recipe(recipe, seed=seed)

    def augment_two_views() -> None:
        augment(images)
        augment(images)

    result: dict[str, Any] = {"conditions": {**conditions(device), "batch_size": batch_size, "image_size": size,
                                             "step_batch_size": step_batch_size, "recipe": recipe,
                                             "model": model_name}}
    recipe_time = measure(f"{recipe} recipe, 2 views", augment_two_views, items=batch_size, warmup=warmup,
                          repeats=repeats, device=device)
    result["recipe"] = recipe_time.as_dict()
    if not skip_step:
        torch.manual_seed(seed)  # timm initialises weights from the global generator
        model = timm.create_model(model_name, pretrained=False, num_classes=128).to(device)
        model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
        views = tuple(augment(images[:step_batch_size]).contiguous(memory_format=torch.channels_last)
                      for _ in range(2))
        step_time = measure(f"{model_name} MoCo step, 2 views", lambda: moco_step(model, optimizer, views, device),
                            items=step_batch_size, warmup=warmup, repeats=repeats, device=device)
        result["step"] = step_time.as_dict()
        # per image, since the step may run on a smaller batch than the recipe
        result["recipe_cost_vs_step"] = ((recipe_time.ms_per_repeat / batch_size)
                                         / (step_time.ms_per_repeat / step_batch_size))
    return result


def table(result: dict[str, Any]) -> str:
    """The figures as a small text table with the conditions first."""
    c = result["conditions"]
    lines = [f"device {c['device']} {c.get('device_name', '')}  batch {c['batch_size']} "
             f"(step {c['step_batch_size']})  size {c['image_size']}  "
             f"torch threads {c['torch_threads']}  torch {c['torch']}  kornia {c['kornia']}",
             f"{'stage':34s} {'images/s (median)':>18s} {'min..max':>18s} {'ms/batch':>10s}"]
    for key in ("recipe", "step"):
        if key in result:
            m = result[key]
            lines.append(f"{m['name']:34s} {m['median_per_s']:18.1f} "
                         f"{m['min_per_s']:8.1f}..{m['max_per_s']:<8.1f} {m['ms_per_repeat']:10.1f}")
    if "recipe_cost_vs_step" in result:
        lines.append(f"recipe cost relative to the step: {100 * result['recipe_cost_vs_step']:.1f} % "
                     f"(goal on GPU: <= 15 %)")
    return "\n".join(lines)


@click.command("augment", cls=BenchCommand)
@click.option("--device", default=None, help="cpu, cuda or cuda:N. Default: cuda when present.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--size", type=int, default=224, show_default=True, help="Side of each view in pixels.")
@click.option("--recipe", type=click.Choice(["ecom", "mocov2"]), default="ecom", show_default=True)
@click.option("--model", default="resnet50", show_default=True, help="timm model of the training step.")
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--skip-step", is_flag=True, help="Measure the recipe only.")
@click.option("--step-batch-size", type=int, default=None,
              help="Batch of the model step (default: --batch-size on CUDA, at most 32 on CPU).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures to this JSON file.")
def main(device: str | None, batch_size: int, size: int, recipe: str, model: str, warmup: int, repeats: int,
         seed: int, skip_step: bool, step_batch_size: int | None, out: Path | None) -> None:
    """The ecom recipe's images/s on two views, and its cost against a MoCo-style step.

    \b
    Example:
      python -m bench augment --device cpu --batch-size 32 --size 224
    """
    result = run(parse_device(device), batch_size, size, recipe=recipe, model_name=model, warmup=warmup,
                 repeats=repeats, seed=seed, skip_step=skip_step, step_batch_size=step_batch_size)
    click.echo(table(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=2, default=str))
        click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
