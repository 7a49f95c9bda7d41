"""The benchmark's stages: each arrow of tar -> bytes -> pixels -> crops -> views -> step, timed.

Every stage is measured two ways:

* **alone**: only that stage's own work, in this process, on inputs already in memory (the tar
  read alone reads the files, warm in the page cache, in one process). It answers "how fast could
  this step go if nothing else ran?".
* **cumulative**: everything from the tar files up to and including this stage, streamed the
  way training streams it (loader workers, then the device). It answers "how many images/s
  reach this point?". The loader stages run once per loader backend and once for the baseline
  (webdataset + Pillow + torchvision, see :mod:`bench.baseline`).

The training step alone, fed synthetic batches already on the device, is the model's ceiling.
A piece of the project that is not installed makes its stages *unavailable* (with the reason),
never the whole benchmark fail.
"""

from __future__ import annotations

import io
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from bench.timing import Measurement, conditions, measure
from loaders.manifest import ShardSet

STAGES = ("read", "decode", "crops", "recipe", "train", "baseline")
BACKENDS = ("dali", "torch")
# Row titles: alone, a stage is only its own work; cumulative, it adds to the stages before it.
TITLES = {
    "alone": {"read": "tar read (bytes)", "decode": "decode", "crops": "2 random resized crops",
              "recipe": "ecom recipe (2 views)", "train": "MoCo step, synthetic batches"},
    "cumulative": {"read": "tar read (bytes)", "decode": "+ decode", "crops": "+ 2 crops (loader)",
                   "recipe": "+ ecom recipe", "train": "+ MoCo step"},
}


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how; every field is a ``bench`` command option.

    Args:
        shards: what :func:`loaders.load_shard_set` reads (directory, manifest, tar, pattern).
        device: where the recipe and the model run (and where loaders deliver).
        backends: loader backends of ``loaders.build_loader`` to compare (``dali``, ``torch``).
        stages: stages to run, a subset of :data:`STAGES`.
        batch_size: images per batch (each gives two views).
        crop_size: side of each square view.
        model: timm model name of the MoCo encoder (``pretrained=False``).
        warmup: untimed batches before each measurement (worker start-up, caches, kernels).
        iters: batches per timed repetition.
        repeats: timed repetitions; the report gives their median and spread.
        num_workers: loader workers (ours and the baseline's); None: one per core.
        queue_size: MoCo queue length K.
        amp: run the model step under bfloat16 autocast (CUDA only; training does too).
        threads: torch intra-op threads in this process during the run (None: leave as is).
        seed: seeds every random choice (crops, shuffles, synthetic batches, weights).
    """

    shards: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backends: tuple[str, ...] = BACKENDS
    stages: tuple[str, ...] = STAGES
    batch_size: int = 128
    crop_size: int = 224
    model: str = "resnet50"
    warmup: int = 3
    iters: int = 10
    repeats: int = 5
    num_workers: int | None = None
    queue_size: int = 65536
    amp: bool = True
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ValueError(f"unknown stage(s) {unknown or '(none given)'}; choose from {', '.join(STAGES)}")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise ValueError(f"unknown backend(s) {unknown or '(none given)'}; choose from {', '.join(BACKENDS)}")
        for name, low in (("batch_size", 1), ("crop_size", 8), ("iters", 1), ("repeats", 1),
                          ("warmup", 0), ("queue_size", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.queue_size < self.batch_size:
            raise ValueError(f"queue_size (MoCo K={self.queue_size}) must be >= batch_size ({self.batch_size})")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if "train" in self.stages:
            import timm

            if not timm.is_model(self.model):
                raise ValueError(f"unknown timm model {self.model!r}; see timm.list_models(), e.g. resnet50")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} requested but CUDA is not available; use --device cpu")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device}")


@dataclass
class StageResult:
    """One measured row: a stage, alone or cumulative, through one backend."""

    stage: str
    mode: str
    backend: str
    measurement: Measurement
    batch_size: int
    data_wait: float | None = None
    note: str = ""
    wall_seconds: float | None = None

    @property
    def label(self) -> str:
        title = TITLES[self.mode][self.stage]
        return f"{title} [{self.backend}]" if self.backend else title

    def as_dict(self) -> dict[str, Any]:
        low, high = self.measurement.spread
        batches = self.measurement.items_per_repeat // self.batch_size
        return {"stage": self.stage, "mode": self.mode, "backend": self.backend, "label": self.label,
                "images_per_s": {"median": self.measurement.median_rate, "min": low, "max": high},
                "ms_per_batch": self.measurement.ms_per_repeat / batches,
                "data_wait_fraction": self.data_wait, "batch_size": self.batch_size,
                "batches_per_repeat": batches, "seconds": list(self.measurement.seconds),
                "wall_seconds": self.wall_seconds, "note": self.note}


@dataclass
class Unavailable:
    """A stage that could not run here, and why (a missing module, no DALI, ...)."""

    stage: str
    mode: str
    backend: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"stage": self.stage, "mode": self.mode, "backend": self.backend, "reason": self.reason}


@dataclass
class BenchRun:
    """Everything one ``bench`` run measured, with the conditions it ran under."""

    config: BenchConfig
    conditions: dict[str, Any]
    shards: dict[str, Any]
    results: list[StageResult]
    unavailable: list[Unavailable]

    def find(self, stage: str, mode: str, backend: str | None = None) -> list[StageResult]:
        return [r for r in self.results if r.stage == stage and r.mode == mode
                and (backend is None or r.backend == backend)]


# ---------------------------------------------------------------------------------------------
# timing of batch streams


def _time_batches(name: str, one_batch: Callable[[], float], config: BenchConfig) -> tuple[Measurement, float]:
    """Warm up, then time ``repeats`` x ``iters`` calls of ``one_batch``.

    ``one_batch`` processes one batch and returns the seconds it spent waiting for data.

    Returns:
        The measurement and the fraction of the timed seconds spent waiting for data.
    """
    for _ in range(config.warmup):
        one_batch()
    waits: list[float] = []

    def step() -> None:
        waited = 0.0
        for _ in range(config.iters):
            waited += one_batch()
        waits.append(waited)

    measurement = measure(name, step, items=config.iters * config.batch_size, warmup=0,
                          repeats=config.repeats, device=config.device)
    return measurement, min(1.0, sum(waits) / sum(measurement.seconds))


def loader_fed_step(stream: Iterator[Any], recipe: Callable[[torch.Tensor], torch.Tensor],
                    step: "TrainStep") -> Callable[[], float]:
    """One MoCo step fed by the real loader: pull a batch, augment both views, step.

    Returns:
        A callable for :func:`_time_batches` that returns the seconds it waited for the batch.
    """
    def one_batch() -> float:
        batch, waited = _pull(stream)
        with torch.no_grad():
            view_q, view_k = (step.normalise(recipe(view)) for view in batch.views[:2])
        step(view_q, view_k)
        return waited

    return one_batch


def _pull(stream: Iterator[Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    item = next(stream)
    return item, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# tar read and decode: a plain webdataset stream, so they do not depend on any loader backend


def _jpeg_bytes(sample: dict[str, Any]) -> bytes:
    return sample["jpg"]


def _pillow_decode(data: bytes) -> torch.Tensor:
    """Full-size RGB decode with Pillow (libjpeg-turbo), as a :math:`(3, H, W)` uint8 tensor."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        pixels = np.array(image.convert("RGB"))  # H x W x 3, writable (torch warns on read-only)
    return torch.from_numpy(pixels).permute(2, 0, 1)  # 3 x H x W


def _decode_on_cpu(sample: dict[str, Any]) -> tuple[int, ...]:
    # Only the shape leaves the worker: real loaders crop before sending pixels between
    # processes, so shipping whole decoded images would charge decode for a copy nobody makes.
    return tuple(_pillow_decode(sample["jpg"]).shape)


def _as_list(items: list[Any]) -> list[Any]:
    return items


def _sample_stream(urls: Sequence[str], *, batch_size: int, workers: int, seed: int,
                   decode: bool) -> Iterator[list[Any]]:
    """Endless batches (lists) of JPEG bytes, or of decoded images' shapes, from the shards."""
    import webdataset as wds

    dataset = wds.WebDataset(list(urls), resampled=True, shardshuffle=False, seed=seed)
    dataset = dataset.map(_decode_on_cpu if decode else _jpeg_bytes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=_as_list, persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(seed))
    return iter(loader)


def _decode_batch(jpegs: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEG bytes to RGB uint8 tensors on ``device``: nvJPEG on CUDA, Pillow on the CPU."""
    if device.type == "cuda":
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:  # a torchvision without image decoding: decode on the CPU instead
            pass
        else:
            data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
            with warnings.catch_warnings():
                # torchvision >= 0.29 announces that decoding moves to torchcodec; it still works.
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return [_pillow_decode(jpeg).to(device) for jpeg in jpegs]


def _collect(urls: Sequence[str], count: int, seed: int) -> list[bytes]:
    stream = _sample_stream(urls, batch_size=1, workers=0, seed=seed, decode=False)
    return [next(stream)[0] for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# two random resized crops per image, for the crops stage alone


def two_crops(images: list[torch.Tensor], crop_size: int, rng: random.Random) -> list[torch.Tensor]:
    """Two random resized crops of every image, stacked into two batches on the images' device.

    Shape:
        - images: each :math:`(3, H_i, W_i)` uint8; output: two :math:`(N, 3, S, S)` uint8.
    """
    from torchvision.transforms.v2.functional import resized_crop

    from loaders.torch_backend import random_resized_box

    views = []
    for _ in range(2):
        crops = []
        for image in images:
            left, top, width, height = random_resized_box(rng, image.shape[-1], image.shape[-2],
                                                          scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
            crops.append(resized_crop(image, top, left, height, width, [crop_size, crop_size], antialias=True))
        views.append(torch.stack(crops))  # N x 3 x S x S
    return views


# ---------------------------------------------------------------------------------------------
# loaders: ours (per backend) and the baseline, as endless streams of loaders.Batch


def _endless_loader(config: BenchConfig, backend: str, shard_set: ShardSet, batches_needed: int,
                    workers: int) -> tuple[Iterator[Any], str]:
    """Our loader as an endless stream (epoch after epoch), and the backend it resolved to.

    A small shard set is listed several times over, so that one epoch covers every batch the
    measurements take: the loader's start-up then falls into the first warm-up, as it does
    once per epoch in real training, instead of into every repetition.
    """
    from loaders.build import build_loader, dali_available

    if backend == "dali" and not dali_available():
        raise ImportError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130, or -cuda120)")
    copies = 1
    if shard_set.num_samples:
        copies = max(1, math.ceil((batches_needed + 1) * config.batch_size / shard_set.num_samples))
    repeated = ShardSet(shards=shard_set.shards * copies, manifests=shard_set.manifests)

    def build(epoch: int):
        return build_loader(repeated, backend=backend, device=config.device, batch_size=config.batch_size,
                            views=2, crop_size=config.crop_size, seed=config.seed, epoch=epoch,
                            num_workers=workers)

    first = build(0)
    resolved = str(getattr(first, "backend", backend))

    def stream() -> Iterator[Any]:
        loader, epoch = first, 0
        while True:
            produced = 0
            for batch in loader:
                produced += 1
                yield batch
            if produced == 0:
                raise ValueError(f"the {backend} loader yielded no batch: the shards hold fewer samples "
                                 f"than one batch of {config.batch_size}; lower --batch-size")
            epoch += 1
            loader = _next_epoch(loader, build, epoch)

    return stream(), resolved


def _next_epoch(loader: Any, build: Callable[[int], Any], epoch: int) -> Any:
    # Loaders are built per epoch (the shard order depends on it), as the trainer builds them.
    del loader
    return build(epoch)


def _baseline_stream(config: BenchConfig, urls: Sequence[str], workers: int) -> Iterator[Any]:
    from bench.baseline import build_baseline_loader, iterate_baseline

    loader = build_baseline_loader(urls, batch_size=config.batch_size, crop_size=config.crop_size,
                                   num_workers=workers, seed=config.seed)
    return iterate_baseline(loader, config.device)


# ---------------------------------------------------------------------------------------------
# the recipe and the MoCo step


def _build_recipe(config: BenchConfig) -> torch.nn.Module:
    from ecomaug.recipes import build_recipe

    return build_recipe("ecom", seed=config.seed).to(config.device)


class TrainStep:
    """One MoCo training step (forward, backward, SGD update) set up as ``train.py`` sets it up.

    channels_last, split-batch norm over sub-batches of 8 (at most 4) on one process, timm's
    SGD, and bfloat16 autocast on CUDA when ``amp``: the step costs what the trainer's costs.

    Shape:
        - view_q, view_k: :math:`(N, 3, S, S)` float on ``device``, ImageNet-normalised.
    """

    def __init__(self, config: BenchConfig) -> None:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        from timm.optim import create_optimizer_v2

        from ecomaug.moco import MoCo

        bn_splits = min(4, max(1, config.batch_size // 8))
        # timm initialises weights from the global generator: seed it inside a fork so the
        # caller's random state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = MoCo(config.model, K=config.queue_size, bn_splits=bn_splits, seed=config.seed)
        self.model = model.to(config.device, memory_format=torch.channels_last)
        self.model.train()
        lr = 0.03 * config.batch_size / 256
        self.optimizer = create_optimizer_v2(self.model, opt="sgd", lr=lr, weight_decay=1e-4, momentum=0.9)
        self.amp = config.amp and config.device.type == "cuda"
        self.device = config.device
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=config.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_DEFAULT_STD, device=config.device).view(1, 3, 1, 1)

    def normalise(self, view: torch.Tensor) -> torch.Tensor:
        """float [0, 1] -> ImageNet-normalised float, channels_last."""
        return ((view - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def __call__(self, view_q: torch.Tensor, view_k: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            output = self.model(view_q, view_k)
        self.optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        self.optimizer.step()


# ---------------------------------------------------------------------------------------------
# the run


def _reason(error: Exception) -> str:
    """Why a stage could not run, in one line."""
    message = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, ImportError):
        return f"not installed: {message}"
    return f"failed: {type(error).__name__}: {message}"


class _Runner:
    """Runs the selected stages in an order safe for DataLoader forks and DALI threads."""

    def __init__(self, config: BenchConfig, urls: Sequence[str], progress_bar: Any) -> None:
        self.config, self.urls, self.bar = config, list(urls), progress_bar
        self.results: list[StageResult] = []
        self.unavailable: list[Unavailable] = []
        self.rng = random.Random(config.seed)
        self._recipe: torch.nn.Module | None = None
        self._train_step: TrainStep | None = None
        self._jpegs: list[bytes] | None = None
        # Ours and the baseline get the same number of workers: one per core unless told.
        if config.num_workers is None:
            from bench.baseline import default_workers

            self.workers = default_workers()
        else:
            self.workers = config.num_workers

    # lazily built shared pieces (built once, reused by alone and cumulative stages)
    def recipe(self) -> torch.nn.Module:
        if self._recipe is None:
            self._recipe = _build_recipe(self.config)
        return self._recipe

    def train_step(self) -> TrainStep:
        if self._train_step is None:
            self._train_step = TrainStep(self.config)
        return self._train_step

    def jpegs(self) -> list[bytes]:
        if self._jpegs is None:
            # Enough distinct images that caches do not flatter the decode, few enough to hold.
            count = max(self.config.batch_size, min(256, 4 * self.config.batch_size))
            self._jpegs = _collect(self.urls, count, self.config.seed)
        return self._jpegs

    def memory_batch(self, index: int) -> list[bytes]:
        jpegs, size = self.jpegs(), self.config.batch_size
        start = (index * size) % len(jpegs)
        return [jpegs[(start + i) % len(jpegs)] for i in range(size)]

    def attempt(self, stage: str, mode: str, backend: str,
                work: Callable[[], tuple[Measurement, float | None, str]]) -> None:
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
        stream = _sample_stream(self.urls, batch_size=self.config.batch_size, workers=0,
                                seed=self.config.seed, decode=False)
        measurement, _ = _time_batches("read alone", lambda: _pull(stream)[1], self.config)
        return measurement, None, "webdataset tar iteration, 1 process"

    def decode_alone(self) -> tuple[Measurement, float | None, str]:
        counter = iter(range(1 << 62))
        device = self.config.device

        def one_batch() -> float:
            _decode_batch(self.memory_batch(next(counter)), device)
            return 0.0

        measurement, _ = _time_batches("decode alone", one_batch, self.config)
        where = "torchvision nvJPEG on the GPU" if device.type == "cuda" else "Pillow, 1 process"
        return measurement, None, f"full-size decode from memory, {where}"

    def crops_alone(self) -> tuple[Measurement, float | None, str]:
        images = _decode_batch(self.memory_batch(0), self.config.device)

        def one_batch() -> float:
            two_crops(images, self.config.crop_size, self.rng)
            return 0.0

        measurement, _ = _time_batches("crops alone", one_batch, self.config)
        return measurement, None, f"2 x RandomResizedCrop on decoded images, on {self.config.device.type}"

    def recipe_alone(self) -> tuple[Measurement, float | None, str]:
        recipe = self.recipe()
        images = _decode_batch(self.memory_batch(0), self.config.device)
        views = two_crops(images, self.config.crop_size, self.rng)

        def one_batch() -> float:
            with torch.no_grad():
                recipe(views[0])
                recipe(views[1])
            return 0.0

        measurement, _ = _time_batches("recipe alone", one_batch, self.config)
        return measurement, None, f"build_recipe('ecom') on both views of a batch on {self.config.device.type}"

    def train_alone(self) -> tuple[Measurement, float | None, str]:
        step = self.train_step()
        generator = torch.Generator().manual_seed(self.config.seed)
        shape = (self.config.batch_size, 3, self.config.crop_size, self.config.crop_size)
        view_q, view_k = (torch.randn(shape, generator=generator).to(self.config.device)
                          .contiguous(memory_format=torch.channels_last) for _ in range(2))

        def one_batch() -> float:
            step(view_q, view_k)
            return 0.0

        measurement, _ = _time_batches("train ceiling", one_batch, self.config)
        return measurement, None, f"{self.config.model}, synthetic batches already on the device (the ceiling)"

    # ------------------------------------------------------------------ cumulative
    def read_cumulative(self) -> tuple[Measurement, float | None, str]:
        stream = _sample_stream(self.urls, batch_size=self.config.batch_size, workers=self.workers,
                                seed=self.config.seed, decode=False)
        measurement, wait = _time_batches("read cumulative", lambda: _pull(stream)[1], self.config)
        return measurement, wait, f"webdataset tar iteration, {self.workers} workers"

    def decode_cumulative(self) -> tuple[Measurement, float | None, str]:
        device = self.config.device
        on_gpu = device.type == "cuda"
        stream = _sample_stream(self.urls, batch_size=self.config.batch_size, workers=self.workers,
                                seed=self.config.seed, decode=not on_gpu)

        def one_batch() -> float:
            batch, waited = _pull(stream)
            if on_gpu:
                _decode_batch(batch, device)
            return waited

        measurement, wait = _time_batches("decode cumulative", one_batch, self.config)
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
            measurement, wait = _time_batches(f"crops {backend}", lambda: _pull(stream)[1], self.config)
            return measurement, wait, "loader output: two uint8 views on the device"
        recipe = self.recipe()
        if stage == "recipe":
            def one_batch() -> float:
                batch, waited = _pull(stream)
                with torch.no_grad():
                    for view in batch.views:
                        recipe(view)
                return waited

            measurement, wait = _time_batches(f"recipe {backend}", one_batch, self.config)
            return measurement, wait, "loader + ecom recipe on both views"
        measurement, wait = _time_batches(f"train {backend}", loader_fed_step(stream, recipe, self.train_step()),
                                          self.config)
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
    with tqdm(total=total, desc="bench", unit="stage", disable=not progress) as bar:
        runner = _Runner(config, urls, bar)
        for stage in alone:
            runner.attempt(stage, "alone", "", getattr(runner, f"{stage}_alone"))
        for stage in streamed:
            runner.attempt(stage, "cumulative", "", getattr(runner, f"{stage}_cumulative"))
        if "baseline" in selected:
            runner.loader_stages("baseline", lambda: (_baseline_stream(config, urls, runner.workers), "baseline"),
                                 ["crops"])
        # DALI last: its threads must not be running when DataLoader workers fork.
        for backend in sorted(config.backends, key=lambda b: b == "dali"):
            if loader_stages:
                runner.loader_stages(
                    backend, lambda b=backend: _endless_loader(config, b, shard_set, needed, runner.workers),
                    loader_stages)
    return runner
