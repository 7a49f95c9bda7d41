"""Per-listing score normalisation: a cosine measured against the listings' own background.

A raw cosine means nothing on its own: one model puts unrelated listings at 0.3, another (or a
random-init one, or a catalogue of near-identical product shots) at 0.9, and a fixed cosine
threshold then matches nothing or everything. Copy detection meets the same problem and
answers it per query (SSCD, Pizzi et al. 2022, "A Self-Supervised Descriptor for Image Copy
Detection", eq. 8: subtract from each score the query's mean similarity to its nearest
neighbours in a background set that holds no copy of it; its evaluation uses the first three,
``1.00[0,2]``).

Here each listing's *background level* is its mean cosine to the listings of A (ours) ranked
``BACKGROUND_RANKS`` (3rd to 5th) among its neighbours there, itself left out. A is the
background, not B, because one item is listed by many shops in B (that is what gaps.csv
counts), so B's own near neighbours are the item's other listings; our catalogue holds an item
once or a few times, and skipping the first two ranks leaves room for its match (a B listing's
item in A) or a second photo. A pair's normalised score is

    (cosine - level) / (1 - level),   level = mean of the two listings' background levels:

the fraction of the way from "as similar as the items around it" (0) to identical (1). Unlike a
plain difference it does not depend on how much of every embedding is shared: if all vectors
carry a common component, ``cos = c + (1 - c) cos'``, the score is the same for ``cos`` as for
``cos'``, so catalogues whose cosines all lie in 0.57..1 still separate. :data:`DEFAULT_MARGIN`
is 0.5, where a pair is closer to identical than to its background: on the bundled sample's
distinct photos (a pretrained ``tf_efficientnet_lite0``, docs/matching.md) same-item pairs score
0.50..0.91 (5th..95th percentile, median 0.79) and an A listing's most similar other item 0.13
(median; 0.41 at the 90th percentile).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ecomaug.evaluation.background import BACKGROUND_RANKS, background_levels, normalise
from ecomaug.matching.search import SearchResult

__all__ = ["BACKGROUND_RANKS", "DEFAULT_MARGIN", "SCORES", "Scores", "background_levels", "normalise",
           "score_searches"]

# Which score a threshold applies to (``--score``); "auto" picks per run (see MatchOptions).
SCORES = ("cosine", "normalised")
# The uncalibrated threshold on the normalised score: halfway from the background to identical.
DEFAULT_MARGIN = 0.5


@dataclass
class Scores:
    """Each search's scores on both scales, and the background levels the normalised ones use.

    Shape:
        - level_a: :math:`(N_A,)`; level_b: :math:`(N_B + M,)`, B's listings then its M item regions
          (none without ``--query-regions``); each array of ``cosine`` and
          ``normalised``: its search's :math:`(Q, k)`.
    """

    level_a: np.ndarray
    level_b: np.ndarray
    cosine: dict[str, np.ndarray]
    normalised: dict[str, np.ndarray]

    def of(self, score: str) -> dict[str, np.ndarray]:
        """The scores of each search on ``score``'s scale."""
        return self.normalised if score == "normalised" else self.cosine

    def labelled(self, score: str, a_vectors: torch.Tensor, b_vectors: torch.Tensor,
                 a_rows: np.ndarray, b_rows: np.ndarray) -> np.ndarray:
        """The scores of labelled pairs (A row, B row), found by search or not."""
        cosines = (a_vectors[a_rows] * b_vectors[b_rows]).sum(dim=1).numpy()
        return cosines if score == "cosine" else normalise(cosines, self.level_a[a_rows],
                                                           self.level_b[b_rows])


def score_searches(found: dict[str, SearchResult]) -> Scores:
    """Background levels in A (itself left out of an A listing's own) and the normalised scores of
    ``match``'s searches (``a_to_b``, ``b_to_a``, ``b_to_b``, ``a_to_a``, and ``regions_to_a``: B's item
    regions in A, with ``--query-regions``)."""
    aa = found["a_to_a"]
    itself = aa.indices == np.arange(aa.indices.shape[0])[:, None]
    others = -np.sort(-np.where(itself, -np.inf, aa.scores), axis=1)  # best first, itself last
    level_a = background_levels(others)
    level_b = background_levels(found["b_to_a"].scores)
    # With item regions (match --query-regions), a_to_b's rows are B's listings, then their
    # regions (regions_to_a), each with a level of its own, computed as the listings' are.
    level_regions = (background_levels(found["regions_to_a"].scores) if "regions_to_a" in found
                     else np.zeros(0, dtype=np.float32))
    level_rows = np.concatenate([level_b, level_regions])
    levels = {"a_to_b": (level_a, level_rows), "b_to_a": (level_b, level_a), "b_to_b": (level_b, level_b),
              "regions_to_a": (level_regions, level_a)}
    normalised = {}
    for name, (query, database) in levels.items():
        if name not in found:
            continue
        result = found[name]
        normalised[name] = normalise(result.scores, query[:, None],
                                     database[np.maximum(result.indices, 0)])
    return Scores(level_a=level_a, level_b=level_rows,
                   cosine={name: found[name].scores for name in normalised}, normalised=normalised)
