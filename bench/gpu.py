"""The GPU section of the benchmark: the figures a GPU run is held to, each beside its goal.

* the DALI loader, every graph variant the device runs (``mixed`` decode on CUDA): images/s of
  two views, goal >= 5,000 img/s for the best variant; the PyTorch loader into the device;
* the ``ecom`` recipe on both views of a batch;
* the MoCo step under bfloat16 autocast (as training runs it) and, on CUDA, under float16 with a
  ``GradScaler``; the recipe's share of the bf16 step, goal <= 15 %;
* the step fed by the real loader + recipe against the same step on synthetic batches, goal
  fed / synthetic >= 0.95.

On a CPU it runs as a smoke run with no goals. Correctness on CUDA (views, dtypes, determinism,
finite losses, training end to end) is checked by the test suite's ``cuda`` cases
(``pytest -m cuda``), not here: a benchmark measures.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click
import torch

from bench import pieces
from bench.augment import synthetic_batch
from bench.harness import BenchCommand, parse_device
from bench.streams import time_batches, time_stream
from bench.timing import Measurement, conditions

GOAL_DALI_IMAGES_PER_S = 5000.0
GOAL_RECIPE_SHARE = 0.15
GOAL_FED_RATIO = 0.95


@dataclass(frozen=True)
class Settings:
    """How big and how long the GPU section runs; every field is a command option."""

    shards: str
    device: torch.device
    batch_size: int = 256
    crop_size: int = 224
    model: str = "resnet50"
    warmup: int = 3
    iters: int = 10
    repeats: int = 5
    workers: int = 8
    seed: int = 0

    @property
    def timing(self) -> dict[str, Any]:
        """The keyword arguments of :func:`bench.streams.time_batches`."""
        return {"batch_size": self.batch_size, "warmup": self.warmup, "iters": self.iters,
                "repeats": self.repeats, "device": self.device}


@dataclass
class Row:
    """One figure of the section, the goal it is held to and whether it meets it."""

    name: str
    figure: str
    goal: str = ""
    verdict: str = "n/a"  # PASS, FAIL, or n/a (no goal on this device)
    details: dict[str, Any] = field(default_factory=dict)


def _rate(measurement: Measurement) -> str:
    low, high = measurement.spread
    return f"{measurement.median_rate:,.0f} img/s ({low:,.0f}..{high:,.0f})"


def _judge(settings: Settings, ok: bool) -> str:
    return ("PASS" if ok else "FAIL") if settings.device.type == "cuda" else "n/a"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def loader_rows(settings: Settings, shard_set: Any) -> list[Row]:
    """DALI's graph variants (when DALI is installed) and the PyTorch loader, streamed into the device."""
    from loaders.build import dali_available

    def stream(backend: str, variant: str | None = None) -> Any:
        return pieces.loader_stream(shard_set, backend=backend, device=settings.device,
                                    batch_size=settings.batch_size, crop_size=settings.crop_size, seed=settings.seed,
                                    workers=settings.workers, dali_variant=variant,
                                    batches_needed=settings.warmup + settings.iters * settings.repeats)[0]

    rows = []
    # The PyTorch loader forks DataLoader workers: before any DALI thread exists.
    measured, _, _ = time_stream("torch", stream("torch"), **settings.timing)
    rows.append(Row("torch loader", _rate(measured), details=measured.as_dict()))
    _free(settings.device)
    if not dali_available():
        return rows + [Row("DALI loader", "unavailable: nvidia.dali is not installed",
                           goal=f">= {GOAL_DALI_IMAGES_PER_S:,.0f} img/s", verdict=_judge(settings, False))]
    from loaders.dali_backend import DEFAULT_VARIANT, variants_for

    on_gpu = settings.device.type == "cuda"
    rates = {}
    for variant in variants_for(on_gpu):
        rates[variant], _, _ = time_stream(f"dali/{variant}", stream("dali", variant), **settings.timing)
        _free(settings.device)
    best = max(rates, key=lambda v: rates[v].median_rate)
    default = DEFAULT_VARIANT["gpu" if on_gpu else "cpu"]
    kind = "dali-gpu, mixed decode" if on_gpu else "dali-cpu"
    rows += [Row(f"DALI loader {variant}", _rate(m), details=m.as_dict()) for variant, m in rates.items()]
    rows.append(Row(f"DALI best ({kind})", f"{best} {rates[best].median_rate:,.0f} img/s (default {default})",
                    goal=f">= {GOAL_DALI_IMAGES_PER_S:,.0f} img/s",
                    verdict=_judge(settings, rates[best].median_rate >= GOAL_DALI_IMAGES_PER_S),
                    details={"best": best, "default": default}))
    return rows


def step_rows(settings: Settings, shard_set: Any) -> tuple[list[Row], dict[str, Measurement]]:
    """The recipe on both views, the engine's step in bf16 (and fp16 + GradScaler on CUDA), the recipe's share."""
    s = settings
    recipe = pieces.build_ecom_recipe(s.device, s.seed)
    images = synthetic_batch(s.batch_size, s.crop_size, s.device, s.seed)

    @torch.no_grad()
    def augment() -> float:
        recipe(images)
        recipe(images)
        return 0.0

    recipe_time, _ = time_batches("ecom recipe, 2 views", augment, **s.timing)
    rows = [Row("ecom recipe (2 views)", f"{_rate(recipe_time)}, {recipe_time.ms_per_repeat / s.iters:.1f} ms/batch")]
    measured = {"recipe": recipe_time}
    # bf16 autocast as training runs on CUDA (fp32 on a CPU); fp16 needs a GradScaler, and CUDA.
    for amp in ("bf16", "fp16") if s.device.type == "cuda" else ("none",):
        measured[amp], loss, scale = _time_step(s, shard_set, amp)
        rows.append(Row(f"MoCo step {amp if amp != 'none' else 'fp32'}" + (" + GradScaler" if amp == "fp16" else ""),
                        f"{_rate(measured[amp])}, loss {loss:.3f}" + (f", scale {scale:.0f}" if amp == "fp16" else ""),
                        details=measured[amp].as_dict()))
    measured["step"] = measured["bf16" if s.device.type == "cuda" else "none"]
    share = recipe_time.ms_per_repeat / measured["step"].ms_per_repeat
    rows.append(Row("recipe share of the step", f"{share:.1%}", goal=f"<= {GOAL_RECIPE_SHARE:.0%}",
                    verdict=_judge(s, share <= GOAL_RECIPE_SHARE)))
    return rows, measured


def _time_step(s: Settings, shard_set: Any, amp: str) -> tuple[Measurement, float, float]:
    """The engine's step on synthetic batches already on the device: images/s, last loss, loss scale."""
    step = pieces.engine_step(shard_set, model=s.model, device=s.device, batch_size=s.batch_size,
                              crop_size=s.crop_size, amp=amp, seed=s.seed)
    views = pieces.synthetic_views(s.batch_size, s.crop_size, s.device, s.seed)
    outputs: list[Any] = []

    def one_batch() -> float:
        outputs.append(step(views).loss.detach())
        return 0.0

    measured, _ = time_batches(f"step {amp}", one_batch, **s.timing)
    loss, scale = float(outputs[-1]), float(step.scaler.get_scale()) if step.scaler.is_enabled() else 1.0
    del step, outputs
    _free(s.device)
    return measured, loss, scale


def fed_row(settings: Settings, shard_set: Any, ceiling: Measurement) -> Row:
    """The step fed by our fastest loader and the recipe, against the step on synthetic batches."""
    s = settings
    stream, resolved = pieces.loader_stream(shard_set, backend="auto",
                                            device=s.device, batch_size=s.batch_size, crop_size=s.crop_size,
                                            seed=s.seed, workers=s.workers,
                                            batches_needed=s.warmup + s.iters * s.repeats)
    recipe = pieces.build_ecom_recipe(s.device, s.seed)
    amp = "bf16" if s.device.type == "cuda" else "none"
    step = pieces.engine_step(shard_set, model=s.model, device=s.device, batch_size=s.batch_size,
                              crop_size=s.crop_size, amp=amp, seed=s.seed)
    fed, wait = time_batches(f"fed by {resolved}", pieces.loader_fed_step(stream, recipe, step), **s.timing)
    ratio = fed.median_rate / ceiling.median_rate
    del stream, step
    _free(s.device)
    return Row(f"step fed by {resolved} + recipe", f"{fed.median_rate:,.0f} / synthetic {ceiling.median_rate:,.0f} "
               f"img/s = {ratio:.2f}, data wait {wait:.0%}", goal=f"fed/synthetic >= {GOAL_FED_RATIO}",
               verdict=_judge(s, ratio >= GOAL_FED_RATIO), details={"fed": fed.as_dict(), "ratio": ratio})


def run(settings: Settings) -> list[Row]:
    """Every row of the GPU section, loaders first (their workers fork before DALI threads start)."""
    from loaders.manifest import load_shard_set

    shard_set = load_shard_set(settings.shards)
    rows = loader_rows(settings, shard_set)
    measured_rows, measured = step_rows(settings, shard_set)
    return rows + measured_rows + [fed_row(settings, shard_set, measured["step"])]


def table(rows: list[Row]) -> str:
    """The rows as a plain-text table: figure | goal | pass/fail."""
    cells = [("measurement", "figure", "goal", "pass/fail")] + [(r.name, r.figure, r.goal, r.verdict) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@click.command("gpu", cls=BenchCommand)
@click.option("--shards", default=None, help="Shard directory, manifest, .tar or pattern. Default: the bundled sample.")
@click.option("--device", default=None, help="cuda, cuda:N or cpu (a smoke run). Default: cuda when present.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: 256 on CUDA, 8 on CPU.")
@click.option("--crop-size", type=click.IntRange(min=8), default=None, help="Default: 224 on CUDA, 64 on CPU.")
@click.option("--model", default=None, help="timm model of the MoCo encoder. Default: resnet50 on CUDA, resnet18 on CPU.")
@click.option("--iters", type=click.IntRange(min=1), default=None, help="Batches per repetition. Default: 10 on CUDA, 1 on CPU.")
@click.option("--repeats", type=click.IntRange(min=1), default=None, help="Default: 5 on CUDA, 2 on CPU.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Loader workers. Default: min(16, cores).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for gpu.json and gpu.txt. Default: print the table only.")
def gpu(shards: str | None, device: str | None, batch_size: int | None, crop_size: int | None, model: str | None,
        iters: int | None, repeats: int | None, workers: int | None, out: Path | None) -> None:
    """The GPU section: loader, recipe and step figures, each against its goal.

    \b
    Example:
      python -m bench gpu --shards ./shards --device cuda --out runs/gpu
      python -m bench gpu --device cpu                   # a smoke run on the bundled sample
    """
    import os

    torch_device = parse_device(device)
    on_gpu = torch_device.type == "cuda"
    defaults = {"batch_size": 256 if on_gpu else 8, "crop_size": 224 if on_gpu else 64,
                "model": "resnet50" if on_gpu else "resnet18", "iters": 10 if on_gpu else 1,
                "repeats": 5 if on_gpu else 2, "warmup": 3 if on_gpu else 1, "workers": min(16, os.cpu_count() or 1)}
    given = {"batch_size": batch_size, "crop_size": crop_size, "model": model, "iters": iters, "repeats": repeats,
             "workers": workers}
    defaults.update({name: value for name, value in given.items() if value is not None})
    if shards is None:
        from bench.sample import sample_shards

        shards = str(sample_shards())
    settings = Settings(shards=shards, device=torch_device, **defaults)
    rows = run(settings)
    text = table(rows)
    info = conditions(torch_device)
    click.echo(f"device {info.get('device_name', info['device'])}, model {settings.model}, batch "
               f"{settings.batch_size} x 2 views of {settings.crop_size} px, workers {settings.workers}")
    click.echo(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        report = {"settings": {**vars(settings), "device": str(torch_device)}, "conditions": info,
                  "rows": [vars(row) for row in rows]}
        (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        (out / "gpu.txt").write_text(text + "\n", encoding="utf-8")
        click.echo(f"wrote {out / 'gpu.json'} and {out / 'gpu.txt'}")


if __name__ == "__main__":
    gpu()
