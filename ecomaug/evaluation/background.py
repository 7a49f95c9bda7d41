"""Background levels and the normalised score: a cosine measured against its neighbours' level.

A raw cosine means nothing on its own: one model puts unrelated images at 0.3, another at 0.9.
Copy detection answers this per query (SSCD, Pizzi et al. 2022, eq. 8: subtract the query's mean
similarity to its nearest neighbours in a background set). ``match`` scores its pairs this way
(:mod:`ecomaug.matching.normalise` says why A is the background there), and evaluation with item
regions ranks each region this way against the gallery (:mod:`ecomaug.evaluation.regions`), so the
two measure the same thing. The score is

    (cosine - level) / (1 - level),   level = mean of the two sides' background levels:

the fraction of the way from "as similar as the items around it" (0) to identical (1).
"""

from __future__ import annotations

import numpy as np

# 1-based ranks, among a row's neighbours in the background (itself left out), averaged as its level.
BACKGROUND_RANKS = (3, 5)
# 1 - level below this is treated as this: a row whose background is identical to it.
FLOOR = 1e-6


def background_levels(scores: np.ndarray, *, ranks: tuple[int, int] = BACKGROUND_RANKS) -> np.ndarray:
    """Each row's mean score over the ranks ``ranks`` (1-based, inclusive) of its neighbours.

    A row with fewer neighbours than ``ranks[1]`` averages those it has from ``ranks[0]`` on, and
    one with fewer than ``ranks[0]`` uses its last (lowest) one; a row with none gets ``-1``.

    Args:
        scores: each row's neighbour cosines, best first, ``-inf`` where there is none.
        ranks: ``(first, last)``, ``1 <= first <= last``.

    Returns:
        The background level of each row.

    Shape:
        - scores: :math:`(N, k)`; output: :math:`(N,)`.
    """
    first, last = ranks
    if not 1 <= first <= last:
        raise ValueError(f"background ranks must satisfy 1 <= first <= last; got {ranks}")
    finite = np.isfinite(scores)
    count = finite.sum(axis=1)  # neighbours are best first, so the finite ones lead
    window = np.zeros_like(finite)
    window[:, first - 1:last] = True
    window &= finite
    short = count < first  # too few neighbours to reach the window: take the last one there is
    window[short] = False
    window[short, np.maximum(count[short] - 1, 0)] = count[short] > 0
    taken = window.sum(axis=1)
    total = np.where(window, scores, 0.0).sum(axis=1)
    return np.where(taken > 0, total / np.maximum(taken, 1), -1.0).astype(np.float32)


def normalise(cosines: np.ndarray, level_x: np.ndarray, level_y: np.ndarray) -> np.ndarray:
    """Normalised scores ``(cosine - level) / (1 - level)``, ``level = (level_x + level_y) / 2``.

    Args:
        cosines: raw cosines of pairs (``-inf`` where there is no pair stays ``-inf``).
        level_x, level_y: the background levels of each pair's two listings (broadcast).

    Returns:
        Scores of ``cosines``' shape, at most 1 (identical), 0 at the background level.
    """
    level = (np.asarray(level_x, dtype=np.float64) + np.asarray(level_y, dtype=np.float64)) / 2
    with np.errstate(invalid="ignore"):
        scores = (cosines - level) / np.maximum(1.0 - level, FLOOR)
    return np.where(np.isfinite(cosines), scores, -np.inf).astype(np.float32)
