"""Shard conversion images/s against this machine's own limit, start-up included.

The limit is the per-image work a conversion cannot avoid -- JPEG decode (with DCT downscaling),
an antialiased bilinear resize (Pillow's, the cheapest antialiased filter), JPEG encode -- run in
a tight loop over in-memory bytes by the same number of processes. The same loop with Pillow's
bicubic filter is shown for reference: the conversion resizes with torch's antialiased bicubic
kernel, bicubic quality at about bilinear cost. Measured against the limit:

* ``conversion``: ``loaders.convert.convert_to_shards`` called in this process; it additionally
  reads files, checks orientation, modes and JPEG structure, hashes for duplicates, ships
  results between processes and writes tars, indexes and the journal;
* ``command``: the whole ``ecomaug shard`` command in a fresh interpreter, wall clock from start
  to exit -- imports, listing, worker start-up (each worker imports torch for its first resize)
  and the final manifest included. Goal: command >= 0.85 x limit.

Wall-clock ratios hold on a quiet machine only: beside other work, a command with three
processes gets a larger share of the cores than a loop with two. So the CPU time of every
process involved (``getrusage``; the command's and the conversion's workers are reaped
children) is reported too, as CPU ms per image: the cost, whatever the load.

    python -m bench convert --workers 2                      # synthetic 1024x768 photos
    python -m bench convert --input ./images --workers 2 --max-size 512 --json bench-convert.json
"""

from __future__ import annotations

import errno
import io
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

from bench.harness import BenchCommand
from bench.timing import Measurement, conditions
from loaders.convert.hygiene import output_size

_BYTES: list[bytes] = []
_SETTINGS: dict[str, int | str] = {}
FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _load(paths: list[str], max_size: int, quality: int, resize_side: str) -> None:
    _BYTES[:] = [Path(path).read_bytes() for path in paths]
    _SETTINGS.update(max_size=max_size, quality=quality, resize_side=resize_side)


def _decode_resize_encode(job: tuple[range, str]) -> float:
    """Returns the CPU seconds this process spent on the job."""
    indices, resample = job
    started = time.process_time()
    total = 0
    for index in indices:
        image = Image.open(io.BytesIO(_BYTES[index]))
        target = output_size(*image.size, int(_SETTINGS["max_size"]), str(_SETTINGS["resize_side"]))
        if target != image.size:
            image.draft("RGB", target)
        image = image.convert("RGB")
        size = output_size(*image.size, int(_SETTINGS["max_size"]), str(_SETTINGS["resize_side"]))
        if size != image.size:
            image = image.resize(size, FILTERS[resample], reducing_gap=3.0)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(_SETTINGS["quality"]))
        total += buffer.tell()
    return time.process_time() - started


def synthetic_photos(folder: Path, count: int, size: tuple[int, int] = (1024, 768), seed: int = 0) -> Path:
    """``count`` photo-like JPEGs (smooth colour fields plus texture), as listing photos are."""
    generator = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    for number in range(count):
        coarse = generator.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16)
        texture = generator.integers(-12, 13, size=(height, width, 1), dtype=np.int16)
        pixels = np.clip(base + texture, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo-{number:05d}.jpg", "JPEG", quality=92)
    return folder


def _image_files(folder: Path) -> list[str]:
    paths = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            with Image.open(path) as image:
                image.size
        except Exception:  # not an image: the conversion skips it, the limit has nothing to do
            continue
        paths.append(str(path))
    return paths


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(step) -> tuple[float, float]:
    """Wall seconds and CPU seconds of one call: the CPU its pool workers report, else this
    process's plus that of the children it reaped meanwhile."""
    started, cpu_self, cpu_children = time.perf_counter(), time.process_time(), _children_cpu()
    reported = step()
    wall = time.perf_counter() - started
    if isinstance(reported, list):
        return wall, float(sum(reported))
    return wall, time.process_time() - cpu_self + _children_cpu() - cpu_children


def run_benchmark(folder: Path, paths: list[str], *, workers: int, max_size: int, quality: int,
                  resize_side: str, repeats: int, scratch: Path
                  ) -> tuple[list[Measurement], dict[str, list[float]], dict]:
    """Limit and reference loops over ``paths`` split evenly over ``workers`` processes that hold
    the bytes in memory; ``convert_to_shards(folder)`` in this process and the ``ecomaug shard``
    command, each into a fresh folder. The four alternate, repetition by repetition, so that
    load from elsewhere hits them alike.

    Returns:
        One :class:`Measurement` per row (wall clock), the CPU seconds of each row's
        repetitions, and the last conversion's counts.
    """
    from loaders.convert import convert_to_shards

    runs: list[dict] = []

    def fresh() -> Path:
        return Path(tempfile.mkdtemp(dir=scratch))

    def convert_once() -> None:
        out = fresh()
        try:
            report = convert_to_shards(folder, out, workers=workers, max_size=max_size, quality=quality,
                                       resize_side=resize_side, progress=False)
            runs.append({"written": report.written, "skipped": report.skipped,
                         "passed_through": report.passed_through, "bytes": report.bytes})
        finally:
            shutil.rmtree(out, ignore_errors=True)

    command = [sys.executable, "-m", "ecomaug.cli", "shard", str(folder), "OUT", "--workers", str(workers),
               "--max-size", str(max_size), "--quality", str(quality), "--resize-side", resize_side,
               "--no-progress"]

    def command_once() -> None:
        out = fresh()
        try:
            subprocess.run(command[:5] + [str(out)] + command[6:], check=True, capture_output=True)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    seconds: dict[str, list[float]] = {name: [] for name in ("bilinear", "bicubic", "conversion", "command")}
    cpu: dict[str, list[float]] = {name: [] for name in seconds}
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with context.Pool(workers, initializer=_load, initargs=(paths, max_size, quality, resize_side)) as pool:
        parts = [range(start, len(paths), workers) for start in range(workers)]
        steps = {"bilinear": lambda: pool.map(_decode_resize_encode, [(part, "bilinear") for part in parts]),
                 "bicubic": lambda: pool.map(_decode_resize_encode, [(part, "bicubic") for part in parts]),
                 "conversion": convert_once, "command": command_once}
        for step in steps.values():  # warm-up: worker start, page cache, Pillow's lazy imports
            step()
        for _ in range(repeats):
            for name, step in steps.items():
                wall, cpu_seconds = _timed(step)
                seconds[name].append(wall)
                cpu[name].append(cpu_seconds)
    names = {"bilinear": "limit: decode+bilinear+encode", "bicubic": "reference: decode+bicubic+encode",
             "conversion": "conversion: convert_to_shards", "command": "command: ecomaug shard (all)"}
    return ([Measurement(names[key], len(paths), seconds[key]) for key in names],
            {names[key]: cpu[key] for key in names}, runs[-1])


@click.command("convert", cls=BenchCommand)
@click.option("--input", "input_dir", type=click.Path(path_type=Path), default=None,
              help="Folder of images (default: synthetic 1024x768 photos).")
@click.option("--count", type=click.IntRange(min=1), default=240, show_default=True,
              help="Synthetic photos when --input is not given.")
@click.option("--workers", type=click.IntRange(min=1), default=os.cpu_count() or 1,
              help="Processes, the conversion's and the limit's. Default: one per core.")
@click.option("--max-size", type=click.IntRange(min=1), default=384, show_default=True)
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True)
@click.option("--resize-side", type=click.Choice(["longer", "shorter"]), default="longer", show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results here.")
def main(input_dir: Path | None, count: int, workers: int, max_size: int, quality: int, resize_side: str,
         repeats: int, json_path: Path | None) -> None:
    """Shard conversion images/s against this machine's own decode -> resize -> encode limit.

    \b
    Example:
      python -m bench convert --workers 2
      python -m bench convert --input ./images --workers 2 --max-size 512 --json bench-convert.json
    """
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as scratch_name:
        scratch = Path(scratch_name)
        if input_dir is None:
            folder = synthetic_photos(scratch / "photos", count)
        elif not input_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "--input is not a folder", str(input_dir))
        else:
            folder = input_dir
        paths = _image_files(folder)
        if not paths:
            raise ValueError(f"{folder}: no images")
        settings = dict(workers=workers, max_size=max_size, quality=quality, resize_side=resize_side,
                        repeats=repeats)
        rows, cpu, last_run = run_benchmark(folder, paths, scratch=scratch, **settings)
    _report(rows, cpu, last_run, paths, settings, json_path,
            source=str(input_dir) if input_dir else f"synthetic {count} x 1024x768")


def _report(rows: list[Measurement], cpu: dict[str, list[float]], last_run: dict, paths: list[Path],
            settings: dict, json_path: Path | None, *, source: str) -> None:
    """Print the table, the ratios to the limit and the conditions; write the JSON when asked."""
    limit, _, conversion, command = rows
    ratios = {"conversion": conversion.median_rate / limit.median_rate,
              "command": command.median_rate / limit.median_rate}
    cpu_ms = {row.name: 1000 * statistics.median(cpu[row.name]) / len(paths) for row in rows}
    print(f"{'stage':34s} {'img/s median':>12s} {'min':>8s} {'max':>8s} {'CPU ms/img':>11s}")
    for row in rows:
        low, high = row.spread
        print(f"{row.name:34s} {row.median_rate:12.1f} {low:8.1f} {high:8.1f} {cpu_ms[row.name]:11.2f}")
    print(f"command / limit = {ratios['command']:.3f} (goal >= 0.85), conversion / limit = "
          f"{ratios['conversion']:.3f}; images {len(paths)}, workers {settings['workers']}, max size {settings['max_size']}, "
          f"quality {settings['quality']}, repeats {settings['repeats']}; passed through untouched "
          f"{last_run['passed_through']} of {last_run['written']} written")
    print(f"CPU per image: command / limit = {cpu_ms[command.name] / cpu_ms[limit.name]:.3f}, conversion / "
          f"limit = {cpu_ms[conversion.name] / cpu_ms[limit.name]:.3f} (below 1: cheaper than the limit); "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    facts = conditions()
    print("conditions: " + ", ".join(f"{k}={facts[k]}" for k in ("python", "cpu_count", "PIL", "webdataset")))
    if json_path is not None:
        payload = {"ratio": ratios["command"], "ratios": ratios, "goal": 0.85,
                   "settings": {**settings, "images": len(paths),
                                "input": source},
                   "limit": limit.as_dict(), "rows": [row.as_dict() for row in rows], "cpu_seconds": cpu,
                   "cpu_ms_per_image": cpu_ms, "load_average": os.getloadavg(), "last_run": last_run,
                   "conditions": facts}
        json_path.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
