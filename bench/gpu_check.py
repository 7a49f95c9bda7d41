"""Every check the project needs a GPU for, in one run: a short table and the same as JSON.

    python -m bench.gpu_check --shards /tmp/shards --out runs/gpu-check             # on a CUDA machine
    python -m bench.gpu_check --shards /tmp/shards --out runs/gpu-check --quick     # smoke run
    python -m bench.gpu_check --shards /tmp/shards --device cpu --quick             # no GPU: CPU smoke

Checks: (1) environment, (2) the DALI loader with ``mixed`` decode, every graph variant the GPU runs, (3) the
PyTorch loader into CUDA, (4) the ``ecom`` recipe on CUDA (throughput, range, determinism,
channels_last), (5) the MoCo ResNet-50 step under bf16 and fp16 + GradScaler and the recipe's
share of it, (6) the step fed by the real loader + recipe against synthetic batches, (7)
``train.py`` end to end in a subprocess, (8) the CUDA cases of the test suite. Each check
catches its own failure and reports it as ``failed: <one line>``; the others still run.

Timing follows :mod:`bench.timing`: warm-up first, the device synchronised around each timed
repetition, the median with the spread. Shard sets smaller than the run needs are listed
several times over (symbolic links in a temporary folder), so that a timed stream never waits
for a new epoch's pipeline and ``train.py`` has enough samples for its queue.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch

from bench.timing import Measurement, conditions, measure

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("environment", "dali-loader", "torch-loader", "recipe", "train-step", "loader-fed",
          "train-script", "cuda-tests")
TITLES = dict(zip(CHECKS, ("1 environment", "2 DALI loader", "3 torch loader", "4 ecom recipe", "5 MoCo step",
                           "6 loader-fed step", "7 train.py", "8 CUDA tests")))
# Run order: the PyTorch loader forks DataLoader workers, so it runs before any DALI thread exists.
RUN_ORDER = ("environment", "recipe", "train-step", "torch-loader", "dali-loader", "loader-fed",
             "train-script", "cuda-tests")
GOAL_DALI_IMAGES_PER_S = 5000.0
GOAL_RECIPE_SHARE = 0.15
GOAL_FED_RATIO = 0.95


@dataclass(frozen=True)
class Settings:
    """How big and how long every check runs (``--quick`` shrinks them; flags override)."""

    device: torch.device
    quick: bool
    batch_size: int
    crop_size: int
    model: str
    warmup: int
    iters: int
    repeats: int
    loader_batches: int
    train_steps: int
    min_samples: int
    workers: int
    train_compile: bool = False
    seed: int = 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def default_settings(device: torch.device, quick: bool, **overrides: Any) -> Settings:
    """The full run on CUDA; ``quick``: a few iterations (on CPU also a small model at 64 px)."""
    workers = min(16, os.cpu_count() or 1)
    if not quick:
        values = dict(batch_size=256, crop_size=224, model="resnet50", warmup=3, iters=10, repeats=5,
                      loader_batches=20, train_steps=60, min_samples=32768)
    elif device.type == "cuda":
        values = dict(batch_size=256, crop_size=224, model="resnet50", warmup=1, iters=2, repeats=2,
                      loader_batches=3, train_steps=12, min_samples=4096)
    else:
        values = dict(batch_size=8, crop_size=64, model="resnet18", warmup=1, iters=1, repeats=2,
                      loader_batches=2, train_steps=4, min_samples=512)
    values.update({key: value for key, value in overrides.items() if value is not None})
    return Settings(device=device, quick=quick, workers=values.pop("workers", workers), **values)


@dataclass
class CheckResult:
    """One row of the table: what was found, the figure that matters and the goal it is held to."""

    name: str
    result: str = ""
    figure: str = ""
    goal: str = ""
    verdict: str = "n/a"  # PASS, FAIL, or n/a (skipped, or no goal applies on this device)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class Skip(Exception):
    """A check that cannot run here (no CUDA, a missing tool); not a failure of the project."""


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _rate(measurement: Measurement) -> str:
    low, high = measurement.spread
    return f"{measurement.median_rate:.0f} img/s ({low:.0f}..{high:.0f})"


def _one_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text}"[:160]


def _conditions(device: torch.device) -> dict[str, Any]:
    """:func:`bench.timing.conditions`, or those of the CPU with the reason when CUDA cannot start."""
    try:
        return conditions(device)
    except RuntimeError as error:  # --device cuda on a machine whose CUDA does not initialise
        return {**conditions(None), "device": str(device), "device_error": _one_line(error)}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# shared context: the shard set (enlarged when small), the bench config, the recipe's cost


class Context:
    """What several checks share; built lazily so a failure only costs the checks that need it."""

    def __init__(self, settings: Settings, shards: str, work_dir: Path) -> None:
        self.settings, self.source, self.work_dir = settings, shards, work_dir
        self._shards: str | None = None
        self.shard_info: dict[str, Any] = {}
        self._recipe_ms: float | None = None

    def shards(self) -> str:
        """The shard set to read: the given one, or it listed several times over when too small."""
        if self._shards is None:
            self._shards = enlarge_shards(self.source, self.settings.min_samples, self.work_dir / "shards",
                                          self.shard_info)
        return self._shards

    def bench_config(self) -> Any:
        from bench.stages import BenchConfig

        s = self.settings
        return BenchConfig(shards=self.shards(), device=s.device, batch_size=s.batch_size, crop_size=s.crop_size,
                           model=s.model, warmup=s.warmup, iters=s.iters, repeats=s.repeats,
                           num_workers=s.workers, amp=True, seed=s.seed, stages=("recipe", "train"))

    def recipe_ms_per_batch(self) -> float:
        """Milliseconds of the ``ecom`` recipe on both views of one batch (measured once)."""
        if self._recipe_ms is None:
            _, measurement = _time_recipe(self.settings)
            self._recipe_ms = measurement.ms_per_repeat / self.settings.iters
        return self._recipe_ms


def enlarge_shards(source: str, min_samples: int, folder: Path, info: dict[str, Any]) -> str:
    """``source``, or a folder of symbolic links listing its shards often enough for ``min_samples``.

    The copies keep their ``.idx`` beside them (named alike), so both loader backends and
    ``train.py --data`` read the folder as an ordinary shard directory.
    """
    from loaders.manifest import load_shard_set

    shard_set = load_shard_set(source)
    count = shard_set.num_samples
    info.update(source=str(source), shards=len(shard_set.shards), samples=count)
    if count is None or count >= min_samples or not shard_set.all_local:
        info["copies"] = 1
        return str(source)
    copies = -(-min_samples // count)
    folder.mkdir(parents=True, exist_ok=True)
    for copy in range(copies):
        for number, shard in enumerate(shard_set.shards):
            stem = folder / f"r{copy:04d}-{number:06d}"
            Path(f"{stem}.tar").symlink_to(Path(shard.url).resolve())
            if shard.index_path:
                Path(f"{stem}.idx").symlink_to(Path(shard.index_path).resolve())
    info.update(copies=copies, samples_used=copies * count, folder=str(folder))
    return str(folder)


# ---------------------------------------------------------------------------------------------
# the checks


def check_environment(ctx: Context) -> CheckResult:
    row = CheckResult(TITLES["environment"], goal="CUDA + DALI + kornia importable" if ctx.settings.cuda
                      else "DALI + kornia importable")
    info = _conditions(ctx.settings.device)
    info.update(cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None)
    problems = []
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401
    except Exception as error:  # ImportError, or a DALI that finds no CUDA runtime
        problems.append(f"nvidia.dali: {_one_line(error)}")
    try:
        import kornia  # noqa: F401
    except Exception as error:
        problems.append(f"kornia: {_one_line(error)}")
    if ctx.settings.cuda:
        if not torch.cuda.is_available():
            problems.append("torch sees no CUDA device")
        else:
            info["bf16_supported"] = torch.cuda.is_bf16_supported()
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(ctx.settings.device).total_memory / 2**30, 1)
    row.details = info
    row.figure = (f"torch {info['torch']} cuda {info['torch_cuda']} | {info.get('device_name', 'cpu')} | "
                  f"dali {info.get('nvidia.dali')} | kornia {info.get('kornia')}")
    row.result = "ok" if not problems else "; ".join(problems)
    row.verdict = _verdict(not problems)
    return row


def _endless(make_loader: Callable[[int], Any]) -> Iterator[Any]:
    epoch = 0
    while True:
        produced = 0
        for batch in make_loader(epoch):
            produced += 1
            yield batch
        if produced == 0:
            raise ValueError("the loader yielded no batch: fewer samples than one batch; lower --batch-size")
        epoch += 1


def _loader_stream(ctx: Context, backend: str, variant: str | None = None) -> Iterator[Any]:
    """Batches of the backend's loader, epoch after epoch, built as ``train.py`` builds them."""
    from loaders.build import make_options

    s = ctx.settings
    shards = ctx.shards()

    def make(epoch: int) -> Any:
        options = make_options(shards, device=s.device, batch_size=s.batch_size, views=2, crop_size=s.crop_size,
                               seed=s.seed, epoch=epoch, num_workers=s.workers)
        if backend == "torch":
            from loaders.torch_backend import TorchLoader

            return TorchLoader(options)
        from loaders.dali_backend import DaliLoader

        return DaliLoader(options, variant=variant)

    return _endless(make)


def _time_stream(name: str, stream: Iterator[Any], s: Settings) -> tuple[Measurement, Any]:
    """Images/s of pulling ``loader_batches`` batches per repetition; returns the last batch too."""
    last: list[Any] = [None]

    def step() -> None:
        for _ in range(s.loader_batches):
            last[0] = next(stream)

    # one warm-up repetition of loader_batches batches covers worker start-up and the pipeline build
    measurement = measure(name, step, items=s.loader_batches * s.batch_size, warmup=1,
                          repeats=s.repeats, device=s.device)
    return measurement, last[0]


def _check_views(batch: Any, s: Settings) -> list[str]:
    """What is wrong with a loader batch (device, dtype, shape), as a list of complaints."""
    expected = (s.batch_size, 3, s.crop_size, s.crop_size)
    problems = []
    if len(batch.views) != 2:
        problems.append(f"{len(batch.views)} views, expected 2")
    for view in batch.views:
        if view.device.type != s.device.type:
            problems.append(f"view on {view.device}, expected {s.device.type}")
        if view.dtype != torch.uint8:
            problems.append(f"view dtype {view.dtype}, expected uint8")
        if tuple(view.shape) != expected:
            problems.append(f"view shape {tuple(view.shape)}, expected {expected}")
    return sorted(set(problems))


def check_dali_loader(ctx: Context) -> CheckResult:
    from loaders.build import dali_available
    from loaders.dali_backend import DEFAULT_VARIANT, variants_for

    s = ctx.settings
    row = CheckResult(TITLES["dali-loader"], goal=f">= {GOAL_DALI_IMAGES_PER_S:.0f} img/s (2 views)" if s.cuda
                      else "(no goal on CPU)")
    if not dali_available():
        raise RuntimeError("nvidia.dali is not importable")
    rates, problems = {}, []
    for variant in variants_for(s.cuda):
        stream = _loader_stream(ctx, "dali", variant)
        measurement, batch = _time_stream(f"dali/{variant}", stream, s)
        problems += _check_views(batch, s)
        rates[variant] = measurement
        del stream, batch
        _free(s.device)
    best = max(rates, key=lambda v: rates[v].median_rate)
    kind = "dali-gpu (mixed decode)" if s.cuda else "dali-cpu"
    default = DEFAULT_VARIANT["gpu" if s.cuda else "cpu"]
    row.details = {"backend": kind, "default_variant": default, "winner": best,
                   "variants": {v: m.as_dict() for v, m in rates.items()}, "problems": problems}
    row.figure = "; ".join(f"{v} {_rate(m)}" for v, m in rates.items())
    row.result = (f"{kind}: views ok, {best} won" if not problems else "; ".join(problems)) + \
        ("" if best == default else f" (default is {default})")
    if s.cuda:
        row.verdict = _verdict(not problems and rates[best].median_rate >= GOAL_DALI_IMAGES_PER_S)
    elif problems:
        row.verdict = "FAIL"
    return row


def check_torch_loader(ctx: Context) -> CheckResult:
    s = ctx.settings
    row = CheckResult(TITLES["torch-loader"], goal="views on the device, uint8")
    stream = _loader_stream(ctx, "torch")
    measurement, batch = _time_stream("torch", stream, s)
    problems = _check_views(batch, s)
    pinned = s.cuda  # TorchLoader pins host memory and copies non_blocking exactly when the device is CUDA
    row.details = {"measurement": measurement.as_dict(), "workers": s.workers, "pin_memory": pinned,
                   "problems": problems}
    row.figure = f"{_rate(measurement)}, {s.workers} workers"
    row.result = ("ok" + (", pinned + non_blocking" if pinned else "")) if not problems else "; ".join(problems)
    row.verdict = _verdict(not problems)
    del stream, batch
    return row


def _time_recipe(s: Settings) -> tuple[torch.Tensor, Measurement]:
    """The ``ecom`` recipe (seeded as ``train.py`` seeds it) on both views of ``iters`` batches."""
    from bench.augment import synthetic_batch
    from ecomaug.recipes import build_recipe

    images = synthetic_batch(s.batch_size, s.crop_size, s.device, s.seed)
    recipe = build_recipe("ecom", generator=torch.Generator(device=s.device).manual_seed(s.seed))

    @torch.no_grad()
    def step() -> None:
        for _ in range(s.iters):
            recipe(images)
            recipe(images)

    measurement = measure("ecom recipe, 2 views", step, items=s.iters * s.batch_size, warmup=s.warmup,
                          repeats=s.repeats, device=s.device)
    return images, measurement


def check_recipe(ctx: Context) -> CheckResult:
    from ecomaug.recipes import build_recipe

    s = ctx.settings
    row = CheckResult(TITLES["recipe"], goal="float32 in [0,1] on device; deterministic; channels_last")
    images, measurement = _time_recipe(s)
    ctx._recipe_ms = measurement.ms_per_repeat / s.iters
    problems = []

    def fresh(**seeding: Any) -> Any:
        return build_recipe("ecom", **seeding)

    with torch.no_grad():
        out = fresh(seed=123)(images)
        if out.device.type != s.device.type or out.dtype != torch.float32:
            problems.append(f"output {out.dtype} on {out.device}")
        low, high = float(out.min()), float(out.max())
        if low < 0.0 or high > 1.0:
            problems.append(f"output range {low:.4f}..{high:.4f}")
        same_seed = torch.equal(out, fresh(seed=123)(images))
        device_generator = [fresh(generator=torch.Generator(device=s.device).manual_seed(123))(images)
                            for _ in range(2)]
        same_generator = torch.equal(*device_generator)
        if not (same_seed and same_generator):
            problems.append(f"not deterministic (seed=: {same_seed}, device generator: {same_generator})")
        channels_last = fresh(seed=123)(images.contiguous(memory_format=torch.channels_last))
        # convolutions may sum in another order in channels_last: equal up to float rounding
        channels_last_diff = float((channels_last - out).abs().max())
        if channels_last_diff > 1e-4:
            problems.append(f"channels_last input differs by {channels_last_diff:.2e}")
    row.details = {"measurement": measurement.as_dict(), "range": [low, high], "deterministic_seed": same_seed,
                   "deterministic_device_generator": same_generator, "channels_last_max_diff": channels_last_diff,
                   "problems": problems}
    row.figure = f"{_rate(measurement)} (2 views), {ctx._recipe_ms:.1f} ms/batch"
    row.result = "ok: range, determinism, channels_last" if not problems else "; ".join(problems)
    row.verdict = _verdict(not problems)
    return row


def _synthetic_views(s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(s.seed)
    shape = (s.batch_size, 3, s.crop_size, s.crop_size)
    return tuple(torch.randn(shape, generator=generator).to(s.device).contiguous(memory_format=torch.channels_last)
                 for _ in range(2))  # type: ignore[return-value]


def _loss_after(step: Any, views: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype | None) -> float:
    """The loss of one more forward after the timed steps: finite unless training blew up."""
    with torch.no_grad(), torch.autocast(step.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        return float(step.model(*views).loss)


def check_train_step(ctx: Context) -> CheckResult:
    from bench.stages import TrainStep

    s = ctx.settings
    row = CheckResult(TITLES["train-step"], goal=f"loss finite; recipe <= {GOAL_RECIPE_SHARE:.0%} of step")
    config = ctx.bench_config()
    views = _synthetic_views(s)
    figures, details, problems = [], {}, []

    step = TrainStep(config)  # bf16 autocast on CUDA, fp32 on CPU: as train.py runs
    precision = "bf16" if step.amp else "fp32"
    ceiling = measure(f"{s.model} MoCo step {precision}", lambda: [step(*views) for _ in range(s.iters)],
                   items=s.iters * s.batch_size, warmup=s.warmup, repeats=s.repeats, device=s.device)
    loss = _loss_after(step, views, torch.bfloat16 if step.amp else None)
    details[precision] = {**ceiling.as_dict(), "loss": loss}
    figures.append(f"{precision} {_rate(ceiling)}")
    if not torch.isfinite(torch.tensor(loss)):
        problems.append(f"{precision} loss {loss}")
    del step
    _free(s.device)

    if s.cuda:
        step = TrainStep(config)
        scaler = torch.amp.GradScaler("cuda")

        def fp16_step() -> None:
            for _ in range(s.iters):
                with torch.autocast("cuda", dtype=torch.float16):
                    output = step.model(*views)
                step.optimizer.zero_grad(set_to_none=True)
                scaler.scale(output.loss).backward()
                scaler.step(step.optimizer)
                scaler.update()

        fp16 = measure(f"{s.model} MoCo step fp16", fp16_step, items=s.iters * s.batch_size, warmup=s.warmup,
                       repeats=s.repeats, device=s.device)
        loss16 = _loss_after(step, views, torch.float16)
        details["fp16"] = {**fp16.as_dict(), "loss": loss16, "grad_scale": float(scaler.get_scale())}
        figures.append(f"fp16+scaler {_rate(fp16)}")
        if not torch.isfinite(torch.tensor(loss16)):
            problems.append(f"fp16 loss {loss16}")
        del step
        _free(s.device)
    else:
        details["fp16"] = "skipped: fp16 autocast + GradScaler need CUDA"

    share = ctx.recipe_ms_per_batch() / (ceiling.ms_per_repeat / s.iters)
    details["recipe_share_of_step"] = share
    figures.append(f"recipe {share:.1%} of step")
    row.details = {**details, "model": s.model, "channels_last": True, "problems": problems}
    row.figure = "; ".join(figures)
    row.result = (f"{s.model}, channels_last, loss finite ({loss:.2f})" if not problems else "; ".join(problems))
    if s.cuda:
        row.verdict = _verdict(not problems and share <= GOAL_RECIPE_SHARE)
    elif problems:
        row.verdict = "FAIL"
    return row


def check_loader_fed(ctx: Context) -> CheckResult:
    from bench.stages import TrainStep, _build_recipe, _endless_loader, _time_batches, loader_fed_step
    from loaders.build import dali_available
    from loaders.manifest import load_shard_set

    s = ctx.settings
    row = CheckResult(TITLES["loader-fed"], goal=f"fed/synthetic >= {GOAL_FED_RATIO}")
    config = ctx.bench_config()
    step = TrainStep(config)
    views = _synthetic_views(s)

    def synthetic() -> float:
        step(*views)
        return 0.0

    ceiling, _ = _time_batches("synthetic", synthetic, config)
    del views
    backend = "dali" if dali_available() else "torch"
    needed = config.warmup + config.iters * config.repeats
    stream, resolved = _endless_loader(config, backend, load_shard_set(ctx.shards()), needed, s.workers)
    recipe = _build_recipe(config)

    measured, wait = _time_batches(f"fed by {resolved}", loader_fed_step(stream, recipe, step), config)
    ratio = measured.median_rate / ceiling.median_rate
    row.details = {"synthetic": ceiling.as_dict(), "fed": measured.as_dict(), "backend": resolved,
                   "ratio": ratio, "data_wait_fraction": wait}
    row.figure = f"fed {measured.median_rate:.0f} / synthetic {ceiling.median_rate:.0f} img/s = {ratio:.2f}, wait {wait:.0%}"
    row.result = f"{resolved} + ecom recipe + {s.model}"
    if s.cuda:
        row.verdict = _verdict(ratio >= GOAL_FED_RATIO)
    del stream, step
    _free(s.device)
    return row


def _median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def check_train_script(ctx: Context) -> CheckResult:
    s = ctx.settings
    row = CheckResult(TITLES["train-script"], goal="exit 0, checkpoint + export written")
    run_dir = ctx.work_dir / "train-run"
    log_every = max(1, s.train_steps // 6)
    command = [sys.executable, "train.py", "--data", ctx.shards(), "--out", str(run_dir),
               "--device", str(s.device), "--preset", "h100" if s.cuda else "sample", "--recipe", "ecom",
               "--model", s.model, "--crop-size", str(s.crop_size), "--batch-size", str(s.batch_size),
               "--max-steps", str(s.train_steps), "--log-every", str(log_every), "--checkpoint-every", "1000000",
               "--num-workers", str(s.workers), "--compile" if s.train_compile else "--no-compile",
               "--no-progress"]
    started = time.perf_counter()
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                             timeout=540 if s.train_compile else 300)
    wall = time.perf_counter() - started
    records = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("event") == "train"]
    steady = train[1:] or train  # the first window holds start-up: cudnn autotuning, DALI build
    checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))
    exported = [(run_dir / "export" / name).is_file() for name in ("backbone.safetensors", "config.json")]
    images_per_s = _median([r["images_per_s"] for r in steady])
    data_wait = _median([r["data_wait"] for r in steady])
    losses = [r["loss"] for r in train]
    start = next((r for r in records if r.get("event") == "start"), {})
    row.details = {"command": " ".join(command[1:]), "returncode": process.returncode, "wall_seconds": wall,
                   "train_records": train, "start": start, "checkpoints": [p.name for p in checkpoints],
                   "export": all(exported), "stderr_tail": process.stderr[-2000:]}
    ok = process.returncode == 0 and bool(checkpoints) and all(exported)
    if images_per_s is not None:
        row.figure = f"{images_per_s:.0f} img/s, data wait {data_wait:.0%}, {wall:.0f} s wall"
    if ok:
        row.result = (f"exit 0, {len(checkpoints)} ckpt + export, {s.train_steps} steps, "
                      f"loss {losses[-1]:.2f}" if losses else "exit 0, ckpt + export")
    else:
        tail = [line for line in process.stderr.strip().splitlines() if line.strip()]
        row.result = (f"failed: exit {process.returncode}: {(tail or ['(no stderr)'])[-1][:140]}"
                      if process.returncode else f"exit 0 but checkpoint {bool(checkpoints)}, export {all(exported)}")
    row.verdict = _verdict(ok)
    return row


def check_cuda_tests(ctx: Context) -> CheckResult:
    s = ctx.settings
    row = CheckResult(TITLES["cuda-tests"], goal="0 failed, > 0 passed")
    if not s.cuda or not torch.cuda.is_available():
        raise Skip("no CUDA")
    try:
        import pytest  # noqa: F401
    except ImportError:
        raise Skip("pytest not installed (add pytest pluggy iniconfig to the wheels)") from None
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_augmentation.py",
               "tests/test_loaders.py", "tests/test_moco.py", "-k", "cuda"]
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=420)
    summary = (process.stdout.strip().splitlines() or [""])[-1]
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)",
                                                                summary)}
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    failures = [line for line in process.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    row.details = {"command": " ".join(command[1:]), "returncode": process.returncode, "counts": counts,
                   "failures": failures, "stdout_tail": process.stdout[-4000:]}
    row.figure = ", ".join(f"{n} {w}" for w, n in counts.items()) or summary[:80]
    row.result = "ok" if failed == 0 and counts.get("passed", 0) > 0 else \
        (failures[0][:140] if failures else f"pytest exit {process.returncode}: {summary[:100]}")
    row.verdict = _verdict(failed == 0 and counts.get("passed", 0) > 0)
    return row


FUNCTIONS: dict[str, Callable[[Context], CheckResult]] = {
    "environment": check_environment, "dali-loader": check_dali_loader, "torch-loader": check_torch_loader,
    "recipe": check_recipe, "train-step": check_train_step, "loader-fed": check_loader_fed,
    "train-script": check_train_script, "cuda-tests": check_cuda_tests,
}
NEEDS_CUDA = ("cuda-tests",)  # the others also run on the CPU, as a smoke run with no goals


def run_checks(ctx: Context, selected: tuple[str, ...], *, log: Callable[[str], None] = print) -> list[CheckResult]:
    """Run the selected checks in :data:`RUN_ORDER`; a check's failure becomes its row, never the run's."""
    rows: dict[str, CheckResult] = {}
    for name in RUN_ORDER:
        if name not in selected:
            continue
        log(f"[gpu_check] {name} ...")
        started = time.perf_counter()
        try:
            if name in NEEDS_CUDA and not ctx.settings.cuda:
                raise Skip("no CUDA")
            row = FUNCTIONS[name](ctx)
        except Skip as reason:
            row = CheckResult(TITLES[name], result=f"skipped: {reason}")
        except Exception as error:  # report the check, keep running the others
            row = CheckResult(TITLES[name], result=f"failed: {_one_line(error)}",
                              verdict="FAIL", details={"traceback": traceback.format_exc()[-3000:]})
        row.seconds = time.perf_counter() - started
        log(f"[gpu_check] {name}: {row.verdict} {row.result} ({row.seconds:.0f} s)")
        rows[name] = row
        _free(ctx.settings.device)
    return [rows[name] for name in CHECKS if name in rows]


def table(rows: list[CheckResult]) -> str:
    """The rows as a plain-text table: check | result | figure | goal | pass/fail."""
    header = ("check", "result", "figure", "goal", "pass/fail")
    cells = [header] + [(r.name, r.result, r.figure, r.goal, r.verdict) for r in rows]
    widths = [min(70, max(len(row[i]) for row in cells)) for i in range(len(header))]
    lines = [" | ".join(cell[:w].ljust(w) for cell, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m bench.gpu_check --shards /tmp/shards --out runs/gpu-check --quick")
    parser.add_argument("--shards", required=True, help="shard directory, manifest, tar or brace pattern")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"),
                        help="folder for gpu_check.json and gpu_check.txt (default: runs/gpu-check)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="a few iterations per check (smoke run)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(CHECKS)}")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--crop-size", type=int, default=None)
    parser.add_argument("--model", default=None, help="timm backbone (default resnet50; resnet18 on CPU --quick)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers / DALI threads (default min(16, cores))")
    parser.add_argument("--train-steps", type=int, default=None, help="steps of the train.py run")
    parser.add_argument("--train-compile", action="store_true", help="train.py with --compile (the h100 preset's)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the enlarged shard list and the train.py run (default: a temporary one)")
    args = parser.parse_args(argv)
    selected = tuple(c.strip() for c in args.only.split(",") if c.strip()) or CHECKS
    unknown = [c for c in selected if c not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"bad --device {args.device!r}: {error}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    for name in ("batch_size", "crop_size", "workers", "train_steps"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "workers" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'workers' else 1}, got {value}")
    try:
        from loaders.manifest import load_shard_set

        if not load_shard_set(args.shards).shards:
            raise ValueError("the shard set is empty")
    except (ValueError, FileNotFoundError) as error:
        parser.error(f"--shards {args.shards}: {_one_line(error)}")
    settings = default_settings(device, args.quick, batch_size=args.batch_size, crop_size=args.crop_size,
                                model=args.model, workers=args.workers, train_steps=args.train_steps,
                                train_compile=args.train_compile)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(device)
    print(f"[gpu_check] device {device} ({_conditions(device).get('device_name', 'cpu')}), "
          f"model {settings.model}, batch {settings.batch_size} x 2 views of {settings.crop_size} px, "
          f"workers {settings.workers}, warmup {settings.warmup}, iters {settings.iters}, repeats {settings.repeats}, "
          f"quick {settings.quick}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(settings, args.shards, work)
        started = time.perf_counter()
        rows = run_checks(ctx, selected, log=lambda line: print(line, file=sys.stderr, flush=True))
    text = table(rows)
    print(text)
    report = {"settings": {**{k: v for k, v in vars(settings).items() if k != "device"}, "device": str(device)},
              "conditions": _conditions(device), "shards": ctx.shard_info, "wall_seconds": time.perf_counter() - started,
              "checks": [vars(row) for row in rows]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    (args.out / "gpu_check.txt").write_text(text + "\n", encoding="utf-8")
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.txt'}")
    return 1 if any(row.verdict == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
