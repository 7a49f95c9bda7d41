"""Where every augmentation's random numbers come from: a seeded ``torch.Generator``, never the global RNG.

Kornia draws from torch's global generators; ecomaug must be reproducible from one seed per process
(``seed + rank``), so each augmentation holds a :class:`RandomSource` and its parameter generator is
a :class:`SeededGenerator`. The :class:`SeededAugmentation` mixin also routes Kornia's per-sample gate
(``batch_prob``) through the same source, and samples on the device of the input it is called with.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from kornia.augmentation.random_generator import RandomGeneratorBase


class RandomSource:
    """One seed, one ``torch.Generator`` per device, created on first use.

    Args:
        seed: the seed of every per-device generator; ``None`` takes one from ``os.urandom``.
        generator: use this generator for everything (numbers are drawn on its device and moved).
    """

    def __init__(self, seed: int | None = None, generator: torch.Generator | None = None) -> None:
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.seed = int.from_bytes(os.urandom(7), "little") if seed is None else seed
        self._fixed = generator
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The generator that draws numbers meant for ``device``."""
        if self._fixed is not None:
            return self._fixed
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def rand(self, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """Uniform [0, 1) float32 numbers of ``shape`` on ``device``."""
        generator = self.generator_for(device)
        return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)

    def uniform(self, shape: Sequence[int], bounds: Sequence[float], device: torch.device) -> torch.Tensor:
        """Uniform numbers in ``[bounds[0], bounds[1])``."""
        low, high = float(bounds[0]), float(bounds[1])
        return low + (high - low) * self.rand(shape, device)

    def bernoulli(self, shape: Sequence[int], p: float, device: torch.device) -> torch.Tensor:
        """Booleans that are True with probability ``p``."""
        return self.rand(shape, device) < p

    def randint(self, high: int | torch.Tensor, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """Integers uniform in ``[0, high)``; ``high`` may be a tensor broadcastable to ``shape``."""
        return (self.rand(shape, device) * high).long().clamp_max(torch.as_tensor(high, device=device) - 1)

    def choice(self, weights: torch.Tensor, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """Indices into ``weights`` (1-D, non-negative) drawn with replacement, ``shape`` of them."""
        cumulative = torch.cumsum(weights.to(device=device, dtype=torch.float32), 0)
        cumulative = cumulative / cumulative[-1]
        index = torch.searchsorted(cumulative, self.rand(shape, device).contiguous(), right=True)
        return index.clamp_max(len(weights) - 1)

    def permutation(self, n: int, device: torch.device) -> torch.Tensor:
        """A random permutation of ``range(n)``."""
        return torch.argsort(self.rand((n,), device))


class SeededGenerator(RandomGeneratorBase):
    """Base of ecomaug's Kornia parameter generators: draws from a :class:`RandomSource`.

    Subclasses implement ``forward(batch_shape, same_on_batch) -> dict[str, Tensor]`` and draw with
    ``self.source`` on ``self.device`` (set by the augmentation to the input's device before each call).
    """

    def __init__(self, source: RandomSource | None = None) -> None:
        super().__init__()
        self.source = source if source is not None else RandomSource()

    def make_samplers(self, device: torch.device, dtype: torch.dtype) -> None:
        # Nothing to build: draws go through ``self.source`` on ``self.device``.
        return None

    def draw(self, batch_size: int, same_on_batch: bool, bounds: Sequence[float]) -> torch.Tensor:
        """``batch_size`` uniform numbers in ``bounds`` (one shared number when ``same_on_batch``)."""
        values = self.source.uniform((1 if same_on_batch else batch_size,), bounds, self.device)
        return values.expand(batch_size) if same_on_batch else values


class GateOnlyGenerator(SeededGenerator):
    """For augmentations without random parameters (flip, grayscale): only the ``p`` gate is drawn."""

    def forward(self, batch_shape: tuple[int, ...], same_on_batch: bool = False) -> dict[str, torch.Tensor]:
        return {}


class SeededAugmentation:
    """Mixin for a Kornia augmentation: the ``p`` gate and the parameters come from a :class:`RandomSource`.

    Put it first in the bases (``class Foo(SeededAugmentation, IntensityAugmentationBase2D)``) and
    give the augmentation a :class:`SeededGenerator` as ``_param_generator``.
    """

    _param_generator: Any
    device: torch.device

    @property
    def source(self) -> RandomSource:
        """The random source shared by the gate and the parameter generator."""
        return self._param_generator.source

    @source.setter
    def source(self, value: RandomSource) -> None:
        self._param_generator.source = value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Sample on the input's device: no host round trip on CUDA, and parameters land where they are used.
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is not None and first.device != self.device:
            self.set_rng_device_and_dtype(first.device, torch.float32)
        return super().forward(*args, **kwargs)

    def __batch_prob_generator__(self, batch_shape: tuple[int, ...], p: float, p_batch: float,
                                 same_on_batch: bool) -> torch.Tensor:
        batch_size = batch_shape[0]
        source: RandomSource = self.source
        if p_batch < 1 and not bool(source.bernoulli((1,), p_batch, self.device)):
            return torch.zeros(batch_size, device=self.device, dtype=self.dtype)
        if same_on_batch:
            return source.bernoulli((1,), p, self.device).to(self.dtype).expand(batch_size)
        return source.bernoulli((batch_size,), p, self.device).to(self.dtype)


def check_probability(name: str, value: float) -> float:
    """``value`` as a float in [0, 1], or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def check_range(name: str, value: Sequence[float], *, low: float = float("-inf"),
                high: float = float("inf")) -> tuple[float, float]:
    """``value`` as a ``(min, max)`` float pair inside ``[low, high]``, or a ValueError naming ``name``."""
    try:
        first, second = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair of numbers, got {value!r}") from None
    if not low <= first <= second <= high:
        raise ValueError(f"{name} must satisfy {low} <= min <= max <= {high}, got {value!r}")
    return first, second
