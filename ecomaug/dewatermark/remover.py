"""Find known watermarks in one image and paint them out: the per-image step of ``ecomaug dewatermark``.

A :class:`Dewatermarker` is a pure, picklable callable that fits the ``image_hook`` contract of
:func:`loaders.convert.convert_to_shards`: ``hook(image) -> (image, meta_update, changed)``.
A mark pasted with opacity ``o`` over a locally even background ``B`` gives
``B + o * alpha * (luminance - B)``: linear in two templates of the mark (its alpha-weighted
luminance and its alpha) whatever ``o`` and ``B`` are. Matching scores each place by how well that
least-squares fit explains the image under the mark's alpha support (dilated a little, so the
transparent parts of its box need not match): the multiple correlation, which is the masked
normalised cross-correlation (NCC) for a one-tone mark, near 1 for a mark at any opacity, and
set to 0 where the fitted ``o`` or ``B`` is impossible. A coarse search over all marks and scales
on a downscaled, blurred image proposes candidates; each is refined over nearby scales and
positions at a finer level; overlapping hits are merged by non-maximum suppression; the mark's
alpha at the found place and scale, dilated, is inpainted with OpenCV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image

MARK_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Measured with `python -m bench.dewatermark_pr` (docs/readme/dewatermark.md): the lowest threshold
# with precision >= 0.99 and no clean image changed is 0.64 for the bench's 4 synthetic marks and
# 0.79 for the bundled 23-mark pool (small thin text marks match more clutter); the larger plus a
# 0.05 margin, rounded up to the next 0.05.
DEFAULT_THRESHOLD = 0.85
# Scale = mark width as a multiple of the mark file's width, in pixels of the image the hook sees.
# Steps of 2 ** (1 / 6) (12 %): coarser steps lose thin text marks before refinement (measured).
STEPS_PER_OCTAVE = 6
DEFAULT_MIN_SCALE, DEFAULT_MAX_SCALE = 0.5, 2.0
FEATURES = ("gray", "gradient")
INPAINT_METHODS = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}
_ALPHA_SUPPORT = 0.1    # alpha above this is "part of the mark" for the matching mask
_ALPHA_REMOVE = 0.02    # alpha above this is painted out (faint fringes are visible on flat colour)
_MIN_TEMPLATE_SIDE = 12  # a template narrower than this (in pixels of its level) is not distinctive
# Both image and template are blurred this much (sigma, px) for the coarse search and the scale
# sweep: thin strokes then still overlap when the size is off by a pixel or two.
_BLUR = 1.0
_TEMPLATE_CACHE = 4096  # prepared templates kept per Dewatermarker (a few MB for a 20-mark pool)


def scale_grid(min_scale: float, max_scale: float, steps_per_octave: int = STEPS_PER_OCTAVE) -> tuple[float, ...]:
    """Geometric scales from ``min_scale`` to at least ``max_scale``, ``steps_per_octave`` per doubling."""
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale} and {max_scale}")
    if steps_per_octave < 1:
        raise ValueError(f"steps_per_octave must be >= 1, got {steps_per_octave}")
    count = math.ceil(round(math.log2(max_scale / min_scale) * steps_per_octave, 6)) + 1
    return tuple(round(min_scale * 2.0 ** (k / steps_per_octave), 4) for k in range(count))


DEFAULT_SCALES = scale_grid(DEFAULT_MIN_SCALE, DEFAULT_MAX_SCALE)


@dataclass(frozen=True)
class Mark:
    """One known watermark.

    Attributes:
        name: identifier recorded in the sample's json (the file stem for a directory pool).
        signal: ``H x W`` float32, the mark's luminance minus 128, times its alpha: what the mark
            adds to a mid-grey background at full opacity.
        alpha: ``H x W`` float32 in [0, 1].
    """

    name: str
    signal: np.ndarray
    alpha: np.ndarray

    @classmethod
    def from_image(cls, name: str, image: Image.Image) -> "Mark":
        """Build a mark from a PIL image; one without an alpha channel is treated as opaque."""
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3] / 255.0
        luminance = rgba[..., 0] * 0.299 + rgba[..., 1] * 0.587 + rgba[..., 2] * 0.114
        ys, xs = np.nonzero(alpha > _ALPHA_REMOVE)
        if len(ys) == 0:
            raise ValueError(f"mark {name!r} is fully transparent; a mark needs visible pixels")
        top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        alpha = np.ascontiguousarray(alpha[top:bottom, left:right])
        signal = np.ascontiguousarray(((luminance - 128.0) * (rgba[..., 3] / 255.0))[top:bottom, left:right])
        if min(alpha.shape) < 8:
            raise ValueError(f"mark {name!r} is {alpha.shape[1]}x{alpha.shape[0]} px after trimming "
                             "transparent borders; marks must be at least 8x8")
        # A shape comes from the alpha (a logo's outline) or from the colours (an opaque JPEG).
        if float(alpha.std()) < 0.01 and float(signal.std()) < 1.0:
            raise ValueError(f"mark {name!r} is one flat colour in a full rectangle; it has no shape to "
                             "match (give it an alpha channel that outlines the logo or text)")
        return cls(name=name, signal=signal, alpha=alpha)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels at scale 1."""
        return self.alpha.shape[1], self.alpha.shape[0]


class MarkPool:
    """The known marks to look for, loaded from a folder (PNG with alpha, or JPEG as opaque)."""

    def __init__(self, marks: Sequence[Mark]):
        if not marks:
            raise ValueError("a mark pool needs at least one mark")
        names = [mark.name for mark in marks]
        if len(set(names)) != len(names):
            raise ValueError(f"mark names must be unique, got {sorted(names)}")
        self.marks = tuple(marks)

    @classmethod
    def from_directory(cls, path: str | Path) -> "MarkPool":
        """Load every ``*.png``/``*.jpg``/``*.jpeg``/``*.webp`` directly in ``path`` (named by stem)."""
        directory = Path(path)
        if not directory.is_dir():
            raise NotADirectoryError(20, "Not a directory (expected a folder of mark images)", str(directory))
        files = sorted(p for p in directory.iterdir() if p.suffix.lower() in MARK_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"no mark images ({', '.join(MARK_SUFFIXES)}) in {directory}")
        marks = []
        for file in files:
            with Image.open(file) as image:
                marks.append(Mark.from_image(file.stem, image))
        return cls(marks)

    @classmethod
    def from_images(cls, images: Mapping[str, Image.Image]) -> "MarkPool":
        """Build a pool from in-memory images keyed by name."""
        return cls([Mark.from_image(name, image) for name, image in images.items()])

    @property
    def names(self) -> list[str]:
        return [mark.name for mark in self.marks]

    def __len__(self) -> int:
        return len(self.marks)

    def __iter__(self) -> Iterator[Mark]:
        return iter(self.marks)


@dataclass(frozen=True)
class Detection:
    """One mark found in an image; ``box`` is ``[x0, y0, x1, y1]`` in pixels (x1, y1 exclusive)."""

    mark: str
    box: tuple[int, int, int, int]
    score: float
    scale: float

    def as_dict(self) -> dict[str, Any]:
        return {"mark": self.mark, "box": list(self.box), "score": round(self.score, 4),
                "scale": round(self.scale, 4)}


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _covered(inner: Sequence[float], outer: Sequence[float]) -> float:
    """Share of ``inner``'s area inside ``outer``."""
    width = min(inner[2], outer[2]) - max(inner[0], outer[0])
    height = min(inner[3], outer[3]) - max(inner[1], outer[1])
    if width <= 0 or height <= 0:
        return 0.0
    return width * height / ((inner[2] - inner[0]) * (inner[3] - inner[1]))


def masked_ncc(image: list[np.ndarray], template: list[np.ndarray], mask: np.ndarray,
               min_std: float) -> np.ndarray:
    """Mean-subtracted normalised cross-correlation of ``template`` over ``image`` inside ``mask``.

    Equal to ``cv2.matchTemplate(..., TM_CCOEFF_NORMED, mask=mask)`` with a binary mask, about
    three times faster, and 0 (not NaN) where the image is flatter than ``min_std`` under the mask.

    Args:
        image: feature channels, each ``H x W`` float32.
        template: the same channels of the template, each ``h x w`` float32.
        mask: ``h x w`` float32 of 0/1.
        min_std: positions whose image standard deviation under the mask is below this score 0.

    Returns:
        ``(H - h + 1) x (W - w + 1)`` float32 scores in [-1, 1].
    """
    basis = _orthonormal([template], mask)[0]
    score, _ = masked_fit(image, basis[:1], mask, min_std)
    return score


def masked_fit(image: list[np.ndarray], basis: list[list[np.ndarray]], mask: np.ndarray,
               min_std: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """How well a linear mix of the ``basis`` templates (plus a constant) explains ``image`` under ``mask``.

    With one regressor this is the signed NCC; with two it is the multiple correlation
    ``sqrt(R^2)`` of a least-squares fit, which lets a two-tone mark match whatever the local
    background level is.

    Args:
        image: feature channels, each ``H x W`` float32.
        basis: 1 or 2 regressors, each a list of channels (``h x w``), centred under the mask,
            zero outside it and orthonormal (see :func:`_orthonormal`).
        mask: ``h x w`` float32 of 0/1.
        min_std: positions whose image standard deviation under the mask is below this score 0.

    Returns:
        ``(score, projections)``: the score map, and per regressor the map of the image's
        projection onto it (the fitted coefficients in the orthonormal basis).
    """
    count = float(mask.sum())
    image_var = 0.0
    for channel in image:
        first = cv2.matchTemplate(channel, mask, cv2.TM_CCORR)
        second = cv2.matchTemplate(channel * channel, mask, cv2.TM_CCORR)
        image_var = image_var + np.maximum(second - first * first / count, 0.0)
    projections = [sum(cv2.matchTemplate(channel, templ, cv2.TM_CCORR) for channel, templ in zip(image, regressor))
                   for regressor in basis]
    norm = np.sqrt(image_var + 1e-6)
    if len(projections) == 1:
        score = projections[0] / norm
    else:
        score = np.sqrt(projections[0] ** 2 + projections[1] ** 2) / norm
    score[image_var < (min_std * min_std) * count * len(image)] = 0.0
    return score.astype(np.float32), projections


def _orthonormal(regressors: list[list[np.ndarray]], mask: np.ndarray,
                 collinear: float = 0.05) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """Gram-Schmidt of masked, centred regressors; drops one that the previous ones nearly explain.

    Returns:
        ``(basis, triangle)`` where ``regressor_i = sum_j triangle[i, j] * basis_j`` (lower-triangular).
    """
    count = float(mask.sum())
    basis: list[list[np.ndarray]] = []
    triangle = np.zeros((len(regressors), len(regressors)))
    for index, regressor in enumerate(regressors):
        vector = [(channel - float((channel * mask).sum()) / count) * mask for channel in regressor]
        original = math.sqrt(sum(float((v * v).sum()) for v in vector))
        for j, unit in enumerate(basis):
            dot = sum(float((v * u).sum()) for v, u in zip(vector, unit))
            triangle[index, j] = dot
            vector = [v - dot * u for v, u in zip(vector, unit)]
        length = math.sqrt(sum(float((v * v).sum()) for v in vector))
        if length > collinear * original and length > 1e-6:
            triangle[index, len(basis)] = length
            basis.append([(v / length).astype(np.float32) for v in vector])
    return basis, triangle[:, : len(basis)]


class Dewatermarker:
    """Find marks of a :class:`MarkPool` in an image and inpaint them.

    Calling it fits the ``image_hook`` of :func:`loaders.convert.convert_to_shards`; it holds no
    state between calls and pickles to worker processes.

    Args:
        pool: the known marks.
        threshold: minimum refined match score (in [-1, 1]) to accept a mark. Precision comes first:
            the default is chosen from the measured precision/recall curve of
            ``python -m bench.dewatermark_pr``.
        scales: mark widths to search, as multiples of the mark file's width (in full-resolution
            pixels of the image). Each candidate is refined at scales a third of a step either side.
        feature: ``"gradient"`` (fit on Sobel x/y: item edges and shading under the mark disturb
            it less; recall 0.75 against 0.47 for ``"gray"`` at precision 1.0 in the bench) or
            ``"gray"`` (fit on luminance).
        coarse_size: long side of the image for the coarse search (templates are searched at a
            finer level when they would be narrower than 12 px there).
        fine_size: long side of the image for refinement (at most the full image).
        coarse_threshold: minimum coarse score for a candidate to be refined.
        max_candidates: at most this many candidates per mark (best coarse score first) are refined.
        nms_iou: a hit overlapping a better one by more than this IoU is dropped.
        dilate: pixels by which the mark's alpha is grown before inpainting (plus the positional
            uncertainty of the refinement level).
        inpaint_radius: neighbourhood radius of ``cv2.inpaint``.
        inpaint_method: ``"telea"`` or ``"ns"`` (Navier-Stokes).
        min_std: image regions flatter than this (grey levels) never match: they hold no mark.
    """

    def __init__(self, pool: MarkPool, *, threshold: float = DEFAULT_THRESHOLD,
                 scales: Sequence[float] = DEFAULT_SCALES, feature: str = "gradient",
                 coarse_size: int = 192, fine_size: int = 1024, coarse_threshold: float = 0.45,
                 max_candidates: int = 4, nms_iou: float = 0.3, dilate: int = 2,
                 inpaint_radius: int = 4, inpaint_method: str = "telea", min_std: float = 2.0):
        if not isinstance(pool, MarkPool):
            raise TypeError(f"pool must be a MarkPool, got {type(pool).__name__}")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [-1, 1] (an NCC score), got {threshold}")
        scales = tuple(sorted(float(s) for s in scales))
        if not scales or scales[0] <= 0:
            raise ValueError(f"scales must be a non-empty list of positive numbers, got {scales}")
        if feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
        if inpaint_method not in INPAINT_METHODS:
            raise ValueError(f"inpaint_method must be one of {tuple(INPAINT_METHODS)}, got {inpaint_method!r}")
        if coarse_size < 32 or fine_size < coarse_size:
            raise ValueError(f"need 32 <= coarse_size <= fine_size, got {coarse_size}, {fine_size}")
        if max_candidates < 1 or dilate < 0 or inpaint_radius < 1 or not 0 < nms_iou <= 1:
            raise ValueError("need max_candidates >= 1, dilate >= 0, inpaint_radius >= 1, 0 < nms_iou <= 1 "
                             f"(got {max_candidates}, {dilate}, {inpaint_radius}, {nms_iou})")
        self.pool = pool
        self.threshold = float(threshold)
        self.scales = scales
        self.feature = feature
        self.coarse_size = int(coarse_size)
        self.fine_size = int(fine_size)
        self.coarse_threshold = float(coarse_threshold)
        self.max_candidates = int(max_candidates)
        self.nms_iou = float(nms_iou)
        self.dilate = int(dilate)
        self.inpaint_radius = int(inpaint_radius)
        self.inpaint_method = inpaint_method
        self.min_std = float(min_std)
        # Refinement searches half the largest step of the scale grid either side of a candidate.
        self._step = max([b / a for a, b in zip(scales, scales[1:])] or [2.0 ** 0.25])
        self._templates: dict[tuple, tuple | None] = {}

    def __repr__(self) -> str:
        settings = ", ".join(f"{name}={getattr(self, name)!r}" for name in (
            "threshold", "feature", "coarse_size", "fine_size", "coarse_threshold", "max_candidates",
            "nms_iou", "dilate", "inpaint_radius", "inpaint_method", "min_std"))
        return (f"Dewatermarker(marks={self.pool.names}, scales={self.scales[0]}..{self.scales[-1]} "
                f"({len(self.scales)}), {settings})")

    def __call__(self, image: Image.Image) -> tuple[Image.Image, dict[str, Any], bool]:
        """Remove the marks found in ``image``.

        Returns:
            ``(image, meta_update, changed)``: the inpainted RGB image, ``{"dewatermark": {"found":
            [{"mark", "box", "score", "scale"}, ...]}}`` and True; or, where nothing is found,
            the very same image object, ``{}`` and False.
        """
        detections = self.detect(image)
        if not detections:
            return image, {}, False
        pixels = np.asarray(image.convert("RGB"))
        mask = self.removal_mask(image.size, detections)
        cleaned = cv2.inpaint(np.ascontiguousarray(pixels), mask, self.inpaint_radius,
                              INPAINT_METHODS[self.inpaint_method])
        meta = {"dewatermark": {"found": [d.as_dict() for d in detections]}}
        return Image.fromarray(cleaned), meta, True

    def detect(self, image: Image.Image, threshold: float | None = None) -> list[Detection]:
        """Marks found in ``image`` with a score of at least ``threshold`` (default: ``self.threshold``).

        Returns:
            Detections after non-maximum suppression, best score first.
        """
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        threshold = self.threshold if threshold is None else float(threshold)
        width, height = image.size
        gray = np.asarray(image.convert("L"), dtype=np.float32)
        levels = _Levels(gray, self.coarse_size, self.feature)
        fine_factor = min(1.0, self.fine_size / max(width, height))

        candidates = []  # (coarse score, mark, scale, x, y) with x, y in full-resolution pixels
        for mark in self.pool:
            for scale in self.scales:
                found = self._coarse(levels, mark, scale)
                candidates.extend(found)
        candidates.sort(key=lambda c: -c[0])

        refined = []
        per_mark: dict[str, int] = {}
        for _, mark, scale, x, y in _suppress_candidates(candidates, self.nms_iou):
            # A quota per mark: one mark that resembles busy content must not crowd out the others.
            per_mark[mark.name] = per_mark.get(mark.name, 0) + 1
            if per_mark[mark.name] > self.max_candidates:
                continue
            hit = self._refine(levels, fine_factor, mark, scale, x, y)
            if hit is not None and hit.score >= threshold:
                refined.append(hit)
        refined.sort(key=lambda d: -d.score)
        kept: list[Detection] = []
        for hit in refined:
            # Also drop a hit lying mostly inside a better one (a ring logo matching the "O" of a
            # text mark): that region is painted out with the better hit anyway.
            if all(box_iou(hit.box, other.box) <= self.nms_iou and _covered(hit.box, other.box) <= 0.5
                   for other in kept):
                kept.append(hit)
        return kept

    def removal_mask(self, size: tuple[int, int], detections: Sequence[Detection]) -> np.ndarray:
        """The ``H x W`` uint8 mask (255 = inpaint) of the detections' alpha, dilated."""
        width, height = size
        mask = np.zeros((height, width), dtype=np.uint8)
        marks = {mark.name: mark for mark in self.pool}
        fine_factor = min(1.0, self.fine_size / max(width, height))
        for hit in detections:
            x0, y0, x1, y1 = hit.box
            alpha = _resize(marks[hit.mark].alpha, x1 - x0, y1 - y0)
            region = (alpha > _ALPHA_REMOVE).astype(np.uint8) * 255
            cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
            if cx1 <= cx0 or cy1 <= cy0:
                continue
            patch = region[cy0 - y0: cy1 - y0, cx0 - x0: cx1 - x0]
            np.maximum(mask[cy0:cy1, cx0:cx1], patch, out=mask[cy0:cy1, cx0:cx1])
        # Grow by the requested margin plus one refinement-level pixel of positional uncertainty.
        radius = self.dilate + math.ceil(1.0 / fine_factor)
        if radius > 0:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
            mask = cv2.dilate(mask, kernel)
        return mask

    def _coarse(self, levels: "_Levels", mark: Mark, scale: float) -> list[tuple]:
        """Up to 3 local maxima of the coarse score map of one mark at one scale."""
        mark_width, mark_height = mark.size
        factor = levels.coarsest_for(min(mark_width, mark_height) * scale)
        # Large marks are searched on a coarser level still (faster), and wide ones with more blur:
        # a scale off by half a grid step then still lines their ends up within the blur.
        while min(mark_width, mark_height) * scale * factor / 2 >= 1.5 * _MIN_TEMPLATE_SIDE:
            factor /= 2
        template_width = round(mark_width * scale * factor)
        template_height = round(mark_height * scale * factor)
        # ... but not so much that thin text blurs away across its short side (measured: +8 % of
        # the marks in the coarse candidates).
        blur = min(3.0, max(_BLUR, round(0.05 * max(template_width, template_height)) / 2),
                   max(_BLUR, round(0.16 * min(template_width, template_height)) / 2))
        features = levels.at(factor, blur)
        if template_width > features[0].shape[1] or template_height > features[0].shape[0]:
            return []
        if min(template_width, template_height) < _MIN_TEMPLATE_SIDE // 2:
            return []
        score = self._match(features, mark, template_width, template_height, blur)
        if score is None:
            return []
        peaks = (score >= self.coarse_threshold) & (score >= cv2.dilate(score, np.ones((3, 3), np.uint8)))
        ys, xs = np.nonzero(peaks)
        best = np.argsort(-score[ys, xs])[:3]
        return [(float(score[ys[i], xs[i]]), mark, scale, xs[i] / factor, ys[i] / factor) for i in best]

    def _refine(self, levels: "_Levels", fine_factor: float, mark: Mark, scale: float,
                x: float, y: float) -> Detection | None:
        """Best score near a coarse candidate: scale steps of ~2 px on a blurred level, then 1 px sharp."""
        mark_width, mark_height = mark.size
        factor = max(fine_factor, levels.coarsest_for(min(mark_width, mark_height) * scale))
        long_side = max(mark_width, mark_height) * scale * factor
        centre = ((x + mark_width * scale / 2) * factor, (y + mark_height * scale / 2) * factor)
        pad = 2 * math.ceil(factor / levels.coarse_factor) + 2
        # The coarse grid is off by up to half a step; search that much either side, in 2 px steps.
        steps = math.ceil((self._step ** 0.5 - 1.0) * long_side / 2.0)
        coarse_best = max(((self._score_at(levels, mark, scale * (1 + 2 * k / long_side), factor, centre, pad,
                                           _BLUR), k) for k in range(-steps, steps + 1)),
                          key=lambda item: item[0][0])
        best_scale = scale * (1 + 2 * coarse_best[1] / long_side)
        score, box, sub_scale = max((self._score_at(levels, mark, best_scale * (1 + k / long_side), factor, centre,
                                                    pad, 0.0) for k in (-1, 0, 1)), key=lambda item: item[0])
        if box is None:
            return None
        return Detection(mark=mark.name, box=box, score=score, scale=sub_scale)

    def _score_at(self, levels: "_Levels", mark: Mark, scale: float, factor: float,
                  centre: tuple[float, float], pad: int, blur: float) -> tuple[float, tuple | None, float]:
        """(best score, full-resolution box, scale) of ``mark`` at ``scale`` within ``pad`` of ``centre``."""
        mark_width, mark_height = mark.size
        features = levels.at(factor, blur)
        level_height, level_width = features[0].shape
        template_width = round(mark_width * scale * factor)
        template_height = round(mark_height * scale * factor)
        if template_width > level_width or template_height > level_height or min(template_width, template_height) < 4:
            return -1.0, None, scale
        left = max(0, round(centre[0] - template_width / 2) - pad)
        top = max(0, round(centre[1] - template_height / 2) - pad)
        right = min(level_width, round(centre[0] + template_width / 2) + pad)
        bottom = min(level_height, round(centre[1] + template_height / 2) + pad)
        if right - left < template_width or bottom - top < template_height:
            return -1.0, None, scale
        window = [channel[top:bottom, left:right] for channel in features]
        score = self._match(window, mark, template_width, template_height, blur)
        if score is None:
            return -1.0, None, scale
        _, peak, _, (px, py) = cv2.minMaxLoc(score)
        x0, y0 = round((left + px) / factor), round((top + py) / factor)
        return float(peak), (x0, y0, x0 + round(mark_width * scale), y0 + round(mark_height * scale)), scale

    def _match(self, features: list[np.ndarray], mark: Mark, width: int, height: int,
               blur: float) -> np.ndarray | None:
        """Score map of ``mark`` at ``width x height`` over ``features`` (None: template too small).

        The pasted mark is ``B + o * signal + o * (128 - B) * alpha`` for an opacity ``o`` and a
        local background level ``B``: the image is fitted with both regressors, and a fit whose
        ``o`` is not positive or whose ``B`` is out of [-40, 295] scores 0. A one-tone mark
        (signal proportional to alpha) falls back to the signed NCC of its signal.
        """
        template = self._template(mark, width, height, blur)
        if template is None:
            return None
        basis, triangle, mask = template
        score, projections = masked_fit(features, basis, mask, self.min_std)
        if len(basis) == 2:
            # projections = triangle^T @ (o, o * (128 - B) / 255): solve the 2x2 triangular system.
            offset = projections[1] / triangle[1, 1]
            opacity = (projections[0] - triangle[1, 0] * offset) / triangle[0, 0]
            background = 128.0 - 255.0 * offset / np.where(np.abs(opacity) < 1e-9, 1e-9, opacity)
            score[(opacity <= 0) | (background < -40.0) | (background > 295.0)] = 0.0
        return score

    def _template(self, mark: Mark, width: int, height: int, blur: float) -> tuple | None:
        """``(basis, triangle, mask)`` of ``mark`` at ``width x height``, cached (images of one size repeat)."""
        key = (mark.name, width, height, blur)
        if key in self._templates:
            return self._templates[key]
        signal = _resize(mark.signal, width, height)
        alpha = _resize(mark.alpha, width, height)
        blurred_alpha = alpha
        if blur > 0:
            signal = cv2.GaussianBlur(signal, (0, 0), blur, borderType=cv2.BORDER_CONSTANT)
            blurred_alpha = cv2.GaussianBlur(alpha, (0, 0), blur, borderType=cv2.BORDER_CONSTANT)
        ring = max(1, round(0.08 * min(width, height)))
        support = (alpha > _ALPHA_SUPPORT).astype(np.uint8)
        mask = cv2.dilate(support, np.ones((2 * ring + 1, 2 * ring + 1), np.uint8)).astype(np.float32)
        template = None
        if mask.sum() >= 16:
            basis, triangle = _orthonormal([_features(signal, self.feature),
                                            _features(blurred_alpha * 255.0, self.feature)], mask)
            if basis and triangle[0, 0] > 0:
                template = (basis, triangle, mask)
        if len(self._templates) >= _TEMPLATE_CACHE:
            self._templates.pop(next(iter(self._templates)))
        self._templates[key] = template
        return template

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_templates"] = {}  # a cache: not worth shipping to worker processes
        return state


class _Levels:
    """The image's feature channels at the coarse level and finer ones, computed on demand."""

    def __init__(self, gray: np.ndarray, coarse_size: int, feature: str):
        self.gray = gray
        self.feature = feature
        self.coarse_factor = min(1.0, coarse_size / max(gray.shape))
        self._cache: dict[tuple[float, float], list[np.ndarray]] = {}

    def coarsest_for(self, template_side: float) -> float:
        """The smallest factor >= coarse (doubling up to 1) at which the template is >= 12 px wide."""
        factor = self.coarse_factor
        while factor < 1.0 and template_side * factor < _MIN_TEMPLATE_SIDE:
            factor = min(1.0, factor * 2.0)
        return factor

    def at(self, factor: float, blur: float = 0.0) -> list[np.ndarray]:
        """Feature channels of the image resized by ``factor`` and blurred by ``blur`` (Gaussian sigma, px)."""
        if (factor, blur) not in self._cache:
            height, width = self.gray.shape
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            level = self.gray if factor >= 1.0 else cv2.resize(self.gray, size, interpolation=cv2.INTER_AREA)
            if blur > 0:
                level = cv2.GaussianBlur(level, (0, 0), blur, borderType=cv2.BORDER_REFLECT)
            self._cache[(factor, blur)] = _features(level, self.feature)
        return self._cache[(factor, blur)]


def _features(gray: np.ndarray, feature: str) -> list[np.ndarray]:
    if feature == "gray":
        return [np.ascontiguousarray(gray, dtype=np.float32)]
    return [cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE),
            cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)]


def _resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    shrinking = width < array.shape[1] or height < array.shape[0]
    return cv2.resize(array, (max(1, width), max(1, height)),
                      interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _suppress_candidates(candidates: list[tuple], iou: float) -> list[tuple]:
    """Greedy NMS over coarse candidates (sorted best first) of the same mark.

    Marks are not suppressed by other marks here: a poorly matching mark must not hide the right
    one before refinement decides; the final NMS compares refined scores across marks.
    """
    kept: list[tuple] = []
    boxes: list[tuple[str, tuple[float, float, float, float]]] = []
    for candidate in candidates:
        _, mark, scale, x, y = candidate
        width, height = mark.size
        box = (x, y, x + width * scale, y + height * scale)
        if all(name != mark.name or box_iou(box, other) <= iou for name, other in boxes):
            kept.append(candidate)
            boxes.append((mark.name, box))
    return kept
