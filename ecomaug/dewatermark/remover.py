"""Find known watermarks in one image and paint them out: the per-image step of ``ecomaug dewatermark``.

A :class:`Dewatermarker` is a pure, picklable callable that fits the ``image_hook`` contract of
:func:`loaders.convert.convert_to_shards` (the command passes it in): ``hook(image) -> (image, meta_update, changed)``.
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
from typing import Any, Sequence

import cv2
import numpy as np
from PIL import Image

from ecomaug.dewatermark.detections import Detection, box_iou, covered, suppress_candidates
from ecomaug.dewatermark.fit import (FEATURES, MIN_TEMPLATE_SIDE, FeatureLevels, feature_channels, masked_fit,
                                     orthonormal_basis, resize)
from ecomaug.dewatermark.templates import ALPHA_REMOVE, Mark, MarkPool

# Measured with `python -m bench.dewatermark_pr` (docs/readme/dewatermark.md): the lowest threshold
# with precision >= 0.99 and no clean image changed is 0.64 for the bench's 4 synthetic marks and
# 0.79 for the bundled 23-mark pool (small thin text marks match more clutter); the larger plus a
# 0.05 margin, rounded up to the next 0.05.
DEFAULT_THRESHOLD = 0.85
# Scale = mark width as a multiple of the mark file's width, in pixels of the image the hook sees.
# Steps of 2 ** (1 / 6) (12 %): coarser steps lose thin text marks before refinement (measured).
STEPS_PER_OCTAVE = 6
DEFAULT_MIN_SCALE, DEFAULT_MAX_SCALE = 0.5, 2.0
INPAINT_METHODS = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}
_ALPHA_SUPPORT = 0.1    # alpha above this is "part of the mark" for the matching mask
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
        levels = FeatureLevels(gray, self.coarse_size, self.feature)
        fine_factor = min(1.0, self.fine_size / max(width, height))

        candidates = []  # (coarse score, mark, scale, x, y) with x, y in full-resolution pixels
        for mark in self.pool:
            for scale in self.scales:
                found = self._coarse(levels, mark, scale)
                candidates.extend(found)
        candidates.sort(key=lambda c: -c[0])

        refined = []
        per_mark: dict[str, int] = {}
        for _, mark, scale, x, y in suppress_candidates(candidates, self.nms_iou):
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
            if all(box_iou(hit.box, other.box) <= self.nms_iou and covered(hit.box, other.box) <= 0.5
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
            alpha = resize(marks[hit.mark].alpha, x1 - x0, y1 - y0)
            region = (alpha > ALPHA_REMOVE).astype(np.uint8) * 255
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

    def _coarse(self, levels: "FeatureLevels", mark: Mark, scale: float) -> list[tuple]:
        """Up to 3 local maxima of the coarse score map of one mark at one scale."""
        mark_width, mark_height = mark.size
        factor = levels.coarsest_for(min(mark_width, mark_height) * scale)
        # Large marks are searched on a coarser level still (faster), and wide ones with more blur:
        # a scale off by half a grid step then still lines their ends up within the blur.
        while min(mark_width, mark_height) * scale * factor / 2 >= 1.5 * MIN_TEMPLATE_SIDE:
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
        if min(template_width, template_height) < MIN_TEMPLATE_SIDE // 2:
            return []
        score = self._match(features, mark, template_width, template_height, blur)
        if score is None:
            return []
        peaks = (score >= self.coarse_threshold) & (score >= cv2.dilate(score, np.ones((3, 3), np.uint8)))
        ys, xs = np.nonzero(peaks)
        best = np.argsort(-score[ys, xs])[:3]
        return [(float(score[ys[i], xs[i]]), mark, scale, xs[i] / factor, ys[i] / factor) for i in best]

    def _refine(self, levels: "FeatureLevels", fine_factor: float, mark: Mark, scale: float,
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

    def _score_at(self, levels: "FeatureLevels", mark: Mark, scale: float, factor: float,
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
        signal = resize(mark.signal, width, height)
        alpha = resize(mark.alpha, width, height)
        blurred_alpha = alpha
        if blur > 0:
            signal = cv2.GaussianBlur(signal, (0, 0), blur, borderType=cv2.BORDER_CONSTANT)
            blurred_alpha = cv2.GaussianBlur(alpha, (0, 0), blur, borderType=cv2.BORDER_CONSTANT)
        ring = max(1, round(0.08 * min(width, height)))
        support = (alpha > _ALPHA_SUPPORT).astype(np.uint8)
        mask = cv2.dilate(support, np.ones((2 * ring + 1, 2 * ring + 1), np.uint8)).astype(np.float32)
        template = None
        if mask.sum() >= 16:
            basis, triangle = orthonormal_basis([feature_channels(signal, self.feature),
                                                 feature_channels(blurred_alpha * 255.0, self.feature)], mask)
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
