"""``python -m bench pipeline``: images/s of every stage from the tar to the MoCo step, and which one limits."""

from __future__ import annotations

import click

from bench.harness import BenchCommand, parse_device

CUDA_DEFAULTS = {"batch_size": 128, "model": "resnet50", "warmup": 3, "iters": 10, "repeats": 5}
CPU_DEFAULTS = {"batch_size": 16, "model": "resnet18", "warmup": 2, "iters": 3, "repeats": 3}


@click.command("pipeline", cls=BenchCommand)
@click.option("--shards", type=str, default=None,
              help="Shard directory, manifest, .tar or brace pattern. Default: the bundled sample, "
                   "converted once into a cache folder.")
@click.option("--backend", "backends", type=click.Choice(["dali", "torch"]), multiple=True,
              help="Loader backend(s) to measure; repeat the option for several. Default: both "
                   "(one that is not installed is reported as unavailable).")
@click.option("--stages", type=str, default="read,decode,crops,recipe,train,baseline", show_default=True,
              help="Comma-separated stages to run.")
@click.option("--batch-size", type=int, default=None,
              help="Images per batch (two views each). Default: 128 on CUDA, 16 on CPU.")
@click.option("--crop-size", type=int, default=224, show_default=True, help="Side of each view in pixels.")
@click.option("--model", type=str, default=None,
              help="timm model of the MoCo encoder (pretrained=False). Default: resnet50 on CUDA, resnet18 on CPU.")
@click.option("--device", type=str, default=None, help="cpu, cuda or cuda:N. Default: cuda when present.")
@click.option("--warmup", type=int, default=None,
              help="Untimed batches before each measurement. Default: 3 on CUDA, 2 on CPU.")
@click.option("--iters", type=int, default=None, help="Batches per timed repetition. Default: 10 on CUDA, 3 on CPU.")
@click.option("--repeats", type=int, default=None,
              help="Timed repetitions (the table shows their median and spread). Default: 5 on CUDA, 3 on CPU.")
@click.option("--workers", "num_workers", type=int, default=None,
              help="Loader workers, ours and the baseline's. Default: one per CPU core.")
@click.option("--threads", type=int, default=None,
              help="torch threads in the main process (recipe and model on CPU). Default: torch's.")
@click.option("--amp/--no-amp", default=True, show_default=True, help="bfloat16 autocast for the model step on CUDA.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for bench.json and bench.png. Default: print the table only.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def pipeline(shards: str | None, backends: tuple[str, ...], stages: str, batch_size: int | None, crop_size: int,
          model: str | None, device: str | None, warmup: int | None, iters: int | None, repeats: int | None,
          num_workers: int | None, threads: int | None, amp: bool, seed: int, out: str | None,
          progress: bool) -> None:
    """Measure images/s of each stage, alone and cumulatively, and say which one limits training.

    \b
    Stages: read (tar bytes), decode, crops (decode + two crops, per loader backend), recipe (+ the
    ecom augmentations on the device), train (+ a MoCo step; alone: synthetic batches = the
    model's ceiling), baseline (webdataset + Pillow + torchvision in a DataLoader).

    \b
    Example, a quick look on the bundled sample, then a real run on your shards:
      python -m bench pipeline --device cpu --model resnet10t --batch-size 16 --crop-size 64 --iters 4
      python -m bench pipeline --shards ./shards --device cuda --model resnet50 --out ./bench-results
    """
    from bench.report import conditions_text, table_text, write_outputs
    from bench.runner import run_benchmark
    from bench.stages import STAGES, BenchConfig

    chosen_stages = tuple(s.strip() for s in stages.split(",") if s.strip())
    unknown = [s for s in chosen_stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    torch_device = parse_device(device)
    if shards is None:
        from bench.sample import sample_shards

        click.echo("no --shards given: using the bundled sample (converted once into a cache folder)", err=True)
        shards = str(sample_shards())
    # A CPU cannot run resnet50 at batch 128 for minutes on end: smaller defaults there.
    defaults = CUDA_DEFAULTS if torch_device.type == "cuda" else CPU_DEFAULTS
    given = {"batch_size": batch_size, "model": model, "warmup": warmup, "iters": iters, "repeats": repeats}
    settings = {name: defaults[name] if value is None else value for name, value in given.items()}
    config = BenchConfig(shards=shards, device=torch_device, backends=backends or ("dali", "torch"),
                         stages=chosen_stages or STAGES, crop_size=crop_size, num_workers=num_workers,
                         amp=amp, threads=threads, seed=seed, **settings)
    run = run_benchmark(config, progress=progress)
    click.echo(conditions_text(run))
    click.echo("")
    click.echo(table_text(run))
    if out is not None:
        paths = write_outputs(run, out)
        click.echo("")
        click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    pipeline()
