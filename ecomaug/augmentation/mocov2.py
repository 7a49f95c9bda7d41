"""The MoCo v2 base augmentations: Kornia's own classes, drawing from a seeded source.

Colour jitter, grayscale, Gaussian blur and horizontal flip are exactly Kornia's implementations;
these subclasses only replace where the random numbers come from (Kornia uses torch's global
generators), so a recipe is reproducible from its seed. The random resized crop is the loader's.
"""

from __future__ import annotations

import torch
from kornia.augmentation import ColorJitter, RandomGaussianBlur, RandomGrayscale, RandomHorizontalFlip

from ecomaug.augmentation.sampling import (GateOnlyGenerator, RandomSource, SeededAugmentation, SeededGenerator,
                                           check_probability, check_range)


class SeededColorJitterGenerator(SeededGenerator):
    """Kornia ``ColorJitterGenerator``'s parameters (factors per sample, a random order) from a seeded source."""

    def __init__(self, ranges: dict[str, tuple[float, float]], source: RandomSource | None = None) -> None:
        super().__init__(source)
        self.ranges = ranges

    def forward(self, batch_shape: tuple[int, ...], same_on_batch: bool = False) -> dict[str, torch.Tensor]:
        params = {f"{name}_factor": self.draw(batch_shape[0], same_on_batch, bounds)
                  for name, bounds in self.ranges.items()}
        params["order"] = self.source.permutation(4, self.device).cpu()
        return params


class SeededGaussianSigmaGenerator(SeededGenerator):
    """Kornia ``RandomGaussianBlurGenerator``'s ``sigma`` (B,) from a seeded source.

    With ``reference_size``, ``sigma`` is meant at that image side and is scaled to the batch's
    shorter side, so a blur removes the same share of detail at every resolution.
    """

    def __init__(self, sigma: tuple[float, float], source: RandomSource | None = None,
                 reference_size: int | None = None) -> None:
        super().__init__(source)
        self.sigma, self.reference_size = sigma, reference_size

    def forward(self, batch_shape: tuple[int, ...], same_on_batch: bool = False) -> dict[str, torch.Tensor]:
        sigma = self.draw(batch_shape[0], same_on_batch, self.sigma)
        if self.reference_size is not None:
            sigma = sigma * (min(batch_shape[-2:]) / self.reference_size)
        return {"sigma": sigma}


class SeededColorJitter(SeededAugmentation, ColorJitter):
    """Kornia's ``ColorJitter`` (torchvision semantics) with seeded parameters.

    Args:
        brightness, contrast, saturation: jitter strength ``s``; factors are drawn from ``[1 - s, 1 + s]``.
        hue: hue jitter ``h`` in turns, drawn from ``[-h, h]`` (``h <= 0.5``).
        p: probability that a sample is jittered.
        source: where the random numbers come from.
    """

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1,
                 p: float = 0.8, source: RandomSource | None = None) -> None:
        strengths = {"brightness": brightness, "contrast": contrast, "saturation": saturation}
        for name, value in {**strengths, "hue": hue}.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if hue > 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue!r}")
        super().__init__(brightness, contrast, saturation, hue, p=check_probability("p", p))
        ranges = {name: (max(0.0, 1.0 - value), 1.0 + value) for name, value in strengths.items()}
        ranges["hue"] = (-float(hue), float(hue))
        self._param_generator = SeededColorJitterGenerator(ranges, source)


class SeededGaussianBlur(SeededAugmentation, RandomGaussianBlur):
    """Kornia's ``RandomGaussianBlur`` with a seeded ``sigma``; MoCo v2 uses sigma in (0.1, 2.0), p=0.5.

    MoCo's sigma is in pixels of a 224-px crop. ``reference_size=224`` (the default) keeps that
    meaning at any crop size: sigma is scaled by ``side / 224``, so a 64-px crop is blurred by at
    most 0.57 px, not 2 px (which leaves little to match at 64 px). ``None``: sigma in pixels as given.
    ``kernel_size`` only truncates the kernel: 23 covers 3 sigma of 2.0 at every image size of 12 px or more.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0), kernel_size: int = 23, p: float = 0.5,
                 source: RandomSource | None = None, reference_size: int | None = 224) -> None:
        if not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd int >= 3, got {kernel_size!r}")
        if reference_size is not None and (isinstance(reference_size, bool) or not isinstance(reference_size, int)
                                           or reference_size < 1):
            raise ValueError(f"reference_size must be a positive int or None, got {reference_size!r}")
        sigma = check_range("sigma", sigma, low=1e-3)
        super().__init__(kernel_size=kernel_size, sigma=sigma, p=check_probability("p", p))
        self._param_generator = SeededGaussianSigmaGenerator(sigma, source, reference_size)


class SeededGrayscale(SeededAugmentation, RandomGrayscale):
    """Kornia's ``RandomGrayscale`` with a seeded gate (MoCo v2: p=0.2)."""

    def __init__(self, p: float = 0.2, source: RandomSource | None = None) -> None:
        super().__init__(p=check_probability("p", p))
        self._param_generator = GateOnlyGenerator(source)


class SeededHorizontalFlip(SeededAugmentation, RandomHorizontalFlip):
    """Kornia's ``RandomHorizontalFlip`` with a seeded gate (MoCo v2: p=0.5)."""

    def __init__(self, p: float = 0.5, source: RandomSource | None = None) -> None:
        super().__init__(p=check_probability("p", p))
        self._param_generator = GateOnlyGenerator(source)
