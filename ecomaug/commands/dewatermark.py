"""``ecomaug dewatermark``: shard conversion that finds known marks in each image and inpaints them."""

from __future__ import annotations

from pathlib import Path

import click

from ecomaug.commands import FloatRange
from ecomaug.commands.shard import parse_size
from ecomaug.limits import MAX_IMAGE_SIDE, MAX_WORKERS


@click.command("dewatermark")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=str))
@click.argument("out_dir", metavar="OUT_DIR", type=click.Path(path_type=str))
@click.option("--watermark-dir", "--marks", "marks_dir", required=True, type=click.Path(path_type=Path),
              help="Folder of known marks, the same pool `train.py --watermark-dir` pastes: PNG with alpha, "
                   "or JPEG/RGB PNG whose plain background is keyed out; named by file stem.")
@click.option("--threshold", type=FloatRange(-1, 1), default=None,
              help="Minimum match score in [-1, 1]. Default: the value chosen from the measured "
                   "precision/recall curve (see `python -m bench.dewatermark_pr`).")
@click.option("--min-scale", type=FloatRange(0.01, 16), default=0.5, show_default=True,
              help="Smallest mark width searched, as a multiple of the mark file's width, in pixels of "
                   "the image after --max-size.")
@click.option("--max-scale", type=FloatRange(0.01, 16), default=2.0, show_default=True,
              help="Largest mark width searched (at least --min-scale).")
@click.option("--feature", type=click.Choice(["gray", "gradient"]), default="gradient", show_default=True,
              help="Match on Sobel gradients (better recall in the bench) or on luminance.")
@click.option("--inpaint", "inpaint_method", type=click.Choice(["telea", "ns"]), default="telea",
              show_default=True, help="OpenCV inpainting method.")
@click.option("--dilate", type=click.IntRange(0, 64), default=2, show_default=True,
              help="Pixels by which the mark's alpha is grown before inpainting.")
@click.option("--max-size", type=click.IntRange(32, MAX_IMAGE_SIDE), default=384, show_default=True,
              help="Cap of the longer side in px (never enlarges); marks are searched after this resize.")
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True,
              help="JPEG quality when re-encoding.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Most samples per shard.")
@click.option("--shard-bytes", type=str, default=None, help="Most bytes per shard, e.g. 500MB (optional).")
@click.option("--prefix", type=str, default="shard", show_default=True, help="Shard file name prefix.")
@click.option("--path-column", type=str, default="path", show_default=True,
              help="Manifest column holding the image path (relative to the manifest).")
@click.option("--num-jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the input into this many jobs (e.g. a job array) ...")
@click.option("--job-index", type=click.IntRange(min=0), default=0, show_default=True,
              help="... and convert only this one (0-based).")
@click.option("--workers", type=click.IntRange(0, MAX_WORKERS), default=None,
              help="Worker processes. Default: one per CPU core.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def dewatermark(input_path: str, out_dir: str, marks_dir: Path, threshold: float | None, min_scale: float,
                max_scale: float, feature: str, inpaint_method: str, dilate: int, max_size: int, quality: int,
                shard_size: int, shard_bytes: str | None, prefix: str, path_column: str, num_jobs: int,
                job_index: int, workers: int | None, progress: bool) -> None:
    """Convert INPUT into shards in OUT_DIR, removing known marks from every image on the way.

    Each image is searched for the marks in --watermark-dir (multi-scale masked matching); where one
    scores at least --threshold, its alpha is inpainted and the sample's json gets
    {"dewatermark": {"found": [{"mark", "box", "score", "scale"}]}}. Images without a mark are
    written as they are. Parallel, streaming and resumable exactly like `ecomaug shard`.

    \b
    Examples:
      ecomaug dewatermark ./images ./shards-clean --watermark-dir ./shop_marks --min-scale 0.2 --max-scale 0.8
      ecomaug dewatermark ./images ./shards-clean --watermark-dir ./shop_marks --threshold 0.9 --workers 8
    """
    from ecomaug.dewatermark import DEFAULT_THRESHOLD, Dewatermarker, MarkPool, scale_grid
    from loaders.convert import convert_to_shards

    pool = MarkPool.from_directory(marks_dir)
    remover = Dewatermarker(pool, threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
                            scales=scale_grid(min_scale, max_scale), feature=feature,
                            inpaint_method=inpaint_method, dilate=dilate)
    report = convert_to_shards(
        input_path, out_dir, prefix=prefix, shard_size=shard_size, shard_bytes=parse_size(shard_bytes),
        max_size=max_size, quality=quality, path_column=path_column, num_jobs=num_jobs,
        job_index=job_index, workers=workers, progress=progress, image_hook=remover)
    if report.already_complete:
        click.echo(f"already complete: {report.manifest_path} ({report.written} written, "
                   f"{report.changed} changed); nothing to do")
        return
    click.echo(f"wrote {report.written} of {report.inputs} inputs into {report.shards} shards in {report.out_dir}"
               + (" (resumed)" if report.resumed else ""))
    click.echo(f"changed {report.changed} of {report.written} images (marks from {len(pool)} in {marks_dir} "
               f"at threshold {remover.threshold}); skipped {report.skipped}")
