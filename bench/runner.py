"""Runs the pipeline benchmark's stages (:mod:`bench.stages`) alone and cumulatively, in a safe order.

The stages run alone first (in this process, on inputs in memory), then the plain webdataset
streams, then the baseline and our loaders, DALI last: its threads must not be running when
DataLoader workers fork.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Iterator, Sequence

import torch

from bench import pieces
from bench.stages import BenchConfig, BenchRun, StageResult, Unavailable
from bench.streams import pull, time_batches
from bench.timing import Measurement, conditions
from loaders.manifest import ShardSet

Work = Callable[[], "tuple[Measurement, float | None, str]"]


def _reason(error: Exception) -> str:
    """Why a stage could not run, in one line."""
    message = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, ImportError):
        return f"not installed: {message}"
    if isinstance(error, ValueError):  # not possible here (DALI asked for but absent, ...): the reason says why
        return message
    return f"failed: {type(error).__name__}: {message}"


def _in_memory(one_batch: Callable[[], Any]) -> Callable[[], float]:
    """A batch of work on data already in memory: it never waits for data."""
    def timed() -> float:
        one_batch()
        return 0.0

    return timed


class _Runner:
    """Runs the selected stages in an order safe for DataLoader forks and DALI threads."""

    def __init__(self, config: BenchConfig, shard_set: ShardSet, progress_bar: Any) -> None:
        self.config, self.shard_set, self.bar = config, shard_set, progress_bar
        self.urls = [shard.url for shard in shard_set.shards]
        self.results: list[StageResult] = []
        self.unavailable: list[Unavailable] = []
        self.rng = random.Random(config.seed)
        self._recipe: torch.nn.Module | None = None
        self._train_step: Any = None
        self._jpegs: list[bytes] | None = None
        # Ours and the baseline get the same number of workers: one per core unless told.
        if config.num_workers is None:
            from bench.baseline import default_workers

            self.workers = default_workers()
        else:
            self.workers = config.num_workers

    def time(self, name: str, one_batch: Callable[[], float]) -> tuple[Measurement, float]:
        c = self.config
        return time_batches(name, one_batch, batch_size=c.batch_size, warmup=c.warmup, iters=c.iters,
                            repeats=c.repeats, device=c.device)

    # lazily built shared pieces (built once, reused by alone and cumulative stages)
    def recipe(self) -> torch.nn.Module:
        if self._recipe is None:
            self._recipe = pieces.build_ecom_recipe(self.config.device, self.config.seed)
        return self._recipe

    def train_step(self) -> Any:
        """The training engine's step, as a run on these shards takes it (the recipe is applied apart)."""
        if self._train_step is None:
            c = self.config
            amp = "bf16" if c.amp and c.device.type == "cuda" else "none"
            self._train_step = pieces.engine_step(self.shard_set, model=c.model, device=c.device,
                                                  batch_size=c.batch_size, crop_size=c.crop_size, amp=amp,
                                                  seed=c.seed, queue_size=c.queue_size)
        return self._train_step

    def memory_batch(self, index: int) -> list[bytes]:
        if self._jpegs is None:
            # Enough distinct images that caches do not flatter the decode, few enough to hold.
            count = max(self.config.batch_size, min(256, 4 * self.config.batch_size))
            self._jpegs = pieces.collect_jpegs(self.urls, count, self.config.seed)
        jpegs, size = self._jpegs, self.config.batch_size
        start = (index * size) % len(jpegs)
        return [jpegs[(start + i) % len(jpegs)] for i in range(size)]

    def attempt(self, stage: str, mode: str, backend: str, work: Work) -> None:
        """Run one measurement; a missing piece or a failure becomes an :class:`Unavailable`."""
        self.bar.set_postfix_str(f"{stage} {mode} {backend}".strip())
        started = time.perf_counter()
        try:
            measurement, wait, note = work()
        except Exception as error:  # report the stage, keep measuring the others
            self.unavailable.append(Unavailable(stage, mode, backend, _reason(error)))
        else:
            self.results.append(StageResult(stage, mode, backend, measurement, self.config.batch_size, wait,
                                            note, wall_seconds=time.perf_counter() - started))
        self.bar.update(1)

    # ------------------------------------------------------------------ alone
    def read_alone(self) -> tuple[Measurement, float | None, str]:
        stream = pieces.sample_stream(self.urls, batch_size=self.config.batch_size, workers=0,
                                      seed=self.config.seed, decode=False)
        measurement, _ = self.time("read alone", lambda: pull(stream)[1])
        return measurement, None, "webdataset tar iteration, 1 process"

    def decode_alone(self) -> tuple[Measurement, float | None, str]:
        counter, device = iter(range(1 << 62)), self.config.device
        measurement, _ = self.time("decode alone", _in_memory(
            lambda: pieces.decode_batch(self.memory_batch(next(counter)), device)))
        where = "torchvision nvJPEG on the GPU" if device.type == "cuda" else "Pillow, 1 process"
        return measurement, None, f"full-size decode from memory, {where}"

    def crops_alone(self) -> tuple[Measurement, float | None, str]:
        images = pieces.decode_batch(self.memory_batch(0), self.config.device)
        measurement, _ = self.time("crops alone", _in_memory(
            lambda: pieces.two_crops(images, self.config.crop_size, self.rng)))
        return measurement, None, f"2 x RandomResizedCrop on decoded images, on {self.config.device.type}"

    def recipe_alone(self) -> tuple[Measurement, float | None, str]:
        recipe = self.recipe()
        images = pieces.decode_batch(self.memory_batch(0), self.config.device)
        views = pieces.two_crops(images, self.config.crop_size, self.rng)

        @torch.no_grad()
        def one_batch() -> None:
            recipe(views[0])
            recipe(views[1])

        measurement, _ = self.time("recipe alone", _in_memory(one_batch))
        return measurement, None, f"build_recipe('ecom') on both views of a batch on {self.config.device.type}"

    def train_alone(self) -> tuple[Measurement, float | None, str]:
        step = self.train_step()
        c = self.config
        views = pieces.synthetic_views(c.batch_size, c.crop_size, c.device, c.seed)
        measurement, _ = self.time("train ceiling", _in_memory(lambda: step(views)))
        return measurement, None, f"{c.model}, synthetic batches already on the device (the ceiling)"

    # ------------------------------------------------------------------ cumulative
    def read_cumulative(self) -> tuple[Measurement, float | None, str]:
        stream = pieces.sample_stream(self.urls, batch_size=self.config.batch_size, workers=self.workers,
                                      seed=self.config.seed, decode=False)
        measurement, wait = self.time("read cumulative", lambda: pull(stream)[1])
        return measurement, wait, f"webdataset tar iteration, {self.workers} workers"

    def decode_cumulative(self) -> tuple[Measurement, float | None, str]:
        device = self.config.device
        on_gpu = device.type == "cuda"
        stream = pieces.sample_stream(self.urls, batch_size=self.config.batch_size, workers=self.workers,
                                      seed=self.config.seed, decode=not on_gpu)

        def one_batch() -> float:
            batch, waited = pull(stream)
            if on_gpu:
                pieces.decode_batch(batch, device)
            return waited

        measurement, wait = self.time("decode cumulative", one_batch)
        where = ("bytes from workers, nvJPEG on the GPU" if on_gpu
                 else f"decode in {self.workers} workers, pixels stay there")
        return measurement, wait, f"read + full-size decode, {where}"

    def loader_stages(self, backend: str, make_stream: Callable[[], tuple[Iterator[Any], str]],
                      stages: Sequence[str]) -> None:
        """crops, recipe and train cumulative stages, all fed by one endless loader stream."""
        try:
            stream, resolved = make_stream()
        except Exception as error:  # no such backend here: its stages are unavailable, not fatal
            for stage in stages:
                self.unavailable.append(Unavailable(stage, "cumulative", backend, _reason(error)))
                self.bar.update(1)
            return
        for stage in stages:
            self.attempt(stage, "cumulative", resolved,
                         lambda stage=stage: self._loader_stage(stage, stream, resolved))
        del stream

    def _loader_stage(self, stage: str, stream: Iterator[Any],
                      backend: str) -> tuple[Measurement, float | None, str]:
        if stage == "crops":
            measurement, wait = self.time(f"crops {backend}", lambda: pull(stream)[1])
            return measurement, wait, "loader output: two uint8 views on the device"
        recipe = self.recipe()
        if stage == "recipe":
            def one_batch() -> float:
                batch, waited = pull(stream)
                with torch.no_grad():
                    for view in batch.views:
                        recipe(view)
                return waited

            measurement, wait = self.time(f"recipe {backend}", one_batch)
            return measurement, wait, "loader + ecom recipe on both views"
        measurement, wait = self.time(f"train {backend}", pieces.loader_fed_step(stream, recipe, self.train_step()))
        return measurement, wait, f"loader + recipe + {self.config.model} MoCo step"


def run_benchmark(config: BenchConfig, *, progress: bool = True) -> BenchRun:
    """Measure every selected stage alone and cumulatively, on ``config.shards``.

    Args:
        config: what to measure (see :class:`BenchConfig`).
        progress: show a tqdm bar over the measurements.

    Returns:
        The results, the stages that could not run (with the reason), and the conditions.

    Raises:
        FileNotFoundError: the shards do not exist.
        ValueError: the shards cannot be read or hold fewer samples than two batches.
    """
    from loaders.manifest import load_shard_set

    shard_set = load_shard_set(config.shards)
    if shard_set.num_samples is not None and shard_set.num_samples < 2 * config.batch_size:
        raise ValueError(f"the shards hold {shard_set.num_samples} samples, fewer than two batches of "
                         f"{config.batch_size}; lower --batch-size or add data")
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        runner = _run_stages(config, shard_set, progress)
        info = conditions(config.device)
    finally:
        torch.set_num_threads(threads_before)
    info.update({"batch_size": config.batch_size, "crop_size": config.crop_size, "model": config.model,
                 "warmup_batches": config.warmup, "iters": config.iters, "repeats": config.repeats,
                 "loader_workers": runner.workers, "amp": config.amp and config.device.type == "cuda"})
    shards = {"source": str(config.shards), "shards": len(shard_set.shards), "samples": shard_set.num_samples,
              "bytes": sum(s.bytes or 0 for s in shard_set.shards) or None}
    return BenchRun(config=config, conditions=info, shards=shards, results=runner.results,
                    unavailable=runner.unavailable)


def _run_stages(config: BenchConfig, shard_set: ShardSet, progress: bool) -> _Runner:
    """Run the selected stages: alone first, then the streams, DALI last."""
    from tqdm.auto import tqdm

    urls = [shard.url for shard in shard_set.shards]
    selected = set(config.stages)
    alone = [s for s in ("read", "decode", "crops", "recipe", "train") if s in selected]
    streamed = [s for s in ("read", "decode") if s in selected]
    loader_stages = [s for s in ("crops", "recipe", "train") if s in selected]
    total = len(alone) + len(streamed) + len(loader_stages) * len(config.backends) + ("baseline" in selected)
    # One loader stream feeds all of a backend's stages; one epoch should cover all their batches.
    needed = len(loader_stages) * (config.warmup + config.iters * config.repeats)
    feed = {"device": config.device, "batch_size": config.batch_size, "crop_size": config.crop_size,
            "seed": config.seed}
    with tqdm(total=total, desc="bench", unit="stage", disable=not progress) as bar:
        runner = _Runner(config, shard_set, bar)
        for stage in alone:
            runner.attempt(stage, "alone", "", getattr(runner, f"{stage}_alone"))
        for stage in streamed:
            runner.attempt(stage, "cumulative", "", getattr(runner, f"{stage}_cumulative"))
        if "baseline" in selected:
            runner.loader_stages("baseline", lambda: (pieces.baseline_stream(urls, workers=runner.workers, **feed),
                                                      "baseline"), ["crops"])
        # DALI last: its threads must not be running when DataLoader workers fork.
        for backend in sorted(config.backends, key=lambda b: b == "dali"):
            if loader_stages:
                runner.loader_stages(backend, lambda b=backend: pieces.loader_stream(
                    shard_set, backend=b, workers=runner.workers, batches_needed=needed, **feed), loader_stages)
    return runner
