"""``ecomaug embed``: embeddings of shards, a CSV/JSONL manifest or an image folder, with their keys.

``--out`` a folder streams: parts are written as they are computed, a rerun resumes, and ranks
(``--rank/--world-size``, or torchrun's ``RANK``/``WORLD_SIZE``) split the data. ``--out x.npz``
writes one file at the end (small sets).
"""

from __future__ import annotations

import errno
import os

import click

from ecomaug.limits import MAX_BATCH_SIZE, MAX_INPUT_SIZE, MAX_SEED, MIN_INPUT_SIZE


def raise_disk_full(error: OSError, where: str) -> None:
    """Turn a full disk into the one-line user error (exit 2); re-raise any other OSError."""
    from ecomaug.cli import CommandError
    from ecomaug.evaluation.embed import DiskFullError

    if error.errno != errno.ENOSPC:
        raise error
    if isinstance(error, DiskFullError):
        raise CommandError(str(error)) from error
    raise CommandError(f"disk full while writing {error.filename or where}: no space left on "
                       "device; free some space or write elsewhere, then rerun") from error


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {value!r}") from None


@click.command("embed")
@click.option("--model", "model_path", type=str, default=None,
              help="Export dir (backbone.safetensors + config.json), run dir, or checkpoint .pt.")
@click.option("--random-init", type=str, default=None, metavar="TIMM_NAME",
              help="Instead of --model: a randomly initialised timm backbone (the baseline).")
@click.option("--data", type=str, required=True,
              help="Shards (dir, manifest.json, .tar, brace pattern, URL), a .csv/.jsonl "
                   "manifest with a path column, or a folder of images.")
@click.option("--out", type=click.Path(path_type=str), required=True,
              help="A folder: parts written as they are computed (resumable, one set per rank); "
                   "or a .npz file written at the end: vectors (N x D float32), keys, meta, info.")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=64, show_default=True,
              help="Images per forward pass.")
@click.option("--part-size", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Samples per part file (folder output).")
@click.option("--rank", type=click.IntRange(min=0), default=None,
              help="This process's rank (default: $RANK, else 0). Folder output only.")
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="How many processes share the data (default: $WORLD_SIZE, else 1).")
@click.option("--input-size", type=click.IntRange(MIN_INPUT_SIZE, MAX_INPUT_SIZE), default=None,
              help="Crop side for checkpoints / --random-init (exports carry their own; "
                   "default: the run's crop size, or 224).")
@click.option("--loader", type=click.Choice(["builtin", "auto", "dali", "torch"]), default="builtin",
              show_default=True,
              help="builtin: decode with PIL (as ecomaug eval does); auto/dali/torch: "
                   "loaders.build_loader in eval mode (shards only, .npz output only).")
@click.option("--device", type=str, default="auto", show_default=True,
              help="auto (cuda:$LOCAL_RANK when CUDA is there), cpu, cuda, cuda:N.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of --random-init weights.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def embed(model_path: str | None, random_init: str | None, data: str, out: str, batch_size: int,
          part_size: int, rank: int | None, world_size: int | None, input_size: int | None,
          loader: str, device: str, seed: int, progress: bool) -> None:
    """Embed every image of --data with a trained (or random-init) backbone.

    Rows follow the data's order; keys are the shard keys (or paths for a folder or manifest) and
    meta holds each sample's metadata (item_id, shop, price, ...). Unreadable shards, files (a
    FIFO or device is not read) and images, and the samples a shard's count promises but it does
    not hold, are skipped and listed (key, file, reason) in OUT/skipped-r*.jsonl, or beside
    OUT.npz in OUT.skipped.jsonl, and the closing line counts them; a key repeated inside one
    shard keeps both samples (the later one renamed KEY~1) and is counted.

    \b
    Examples:
      ecomaug embed --model runs/sample --data ./shards --out emb/ours
      torchrun --nproc_per_node=4 -m ecomaug embed --model runs/r50/export --data ./shards --out emb/ours
      ecomaug embed --random-init resnet18 --input-size 64 --data ecomaug/assets/sample/items.csv --out emb/random.npz
    """
    from ecomaug.evaluation.embed import (ReadReport, embed_data, embed_to_parts, load_model,
                                          random_init_model, resolve_device, shortfall)
    from ecomaug.evaluation.embeddings import write_skipped
    from loaders.atomic import check_writable

    if (model_path is None) == (random_init is None):
        raise ValueError("give exactly one of --model PATH and --random-init TIMM_NAME")
    rank = _env_int("RANK", 0) if rank is None else rank
    world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    single_file = out.endswith(".npz")
    if single_file and world_size > 1:
        raise ValueError(f"--out {out}: several ranks write a folder of parts; give a folder")
    if not single_file and loader != "builtin":
        raise ValueError("--loader auto/dali/torch writes one .npz; give --out FILE.npz, or use "
                         "--loader builtin for a streamed folder")
    check_writable(out)  # a read-only --out: one line now, not after the embeddings
    if device == "auto" and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{_env_int('LOCAL_RANK', 0)}"
    target = resolve_device(device)
    if random_init is not None:
        model = random_init_model(random_init, device=target, input_size=input_size or 224, seed=seed)
    else:
        model = load_model(model_path, device=target, input_size=input_size)
    try:
        if single_file:
            read = ReadReport() if loader == "builtin" else None
            embeddings = embed_data(model, data, batch_size=batch_size, loader=loader,
                                    progress=progress, report=read)
            path = embeddings.save(out)
            listed = write_skipped(path.with_suffix(".skipped.jsonl"), read.skipped) if read else None
            lost = shortfall(embeddings.info["read"], where=str(listed)) if read else ""
            click.echo(f"{len(embeddings.keys)} embeddings of size {embeddings.vectors.shape[1]} "
                       f"({model.model_name}, {model.input_size} px, {target}) -> {path}"
                       + (f"; {lost}" if lost else ""))
            return
        report = embed_to_parts(model, data, out, batch_size=batch_size, part_size=part_size,
                                rank=rank, world_size=world_size, progress=progress)
    except OSError as error:
        if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError,
                              NotADirectoryError, FileExistsError)):
            raise
        raise_disk_full(error, out)
    resumed = f", {report.resumed_parts} of them from an earlier run" if report.resumed_parts else ""
    lost = shortfall(report.counts, where=str(report.skipped_file))
    click.echo(f"rank {rank}/{world_size}: {report.rows} embeddings of size {report.dim} in "
               f"{report.parts} parts{resumed} ({model.model_name}, {model.input_size} px, "
               f"{target}) -> {report.folder}" + (f"; {lost}" if lost else ""))
    if report.skipped:
        click.echo(f"{len(report.skipped)} skipped (see {report.skipped_file})", err=True)
    if report.duplicate_keys:
        click.echo(f"{report.duplicate_keys} samples repeat a key of their shard: both kept, the "
                   "later renamed KEY~N", err=True)
