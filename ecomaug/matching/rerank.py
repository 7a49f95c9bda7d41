"""Neighbourhood re-ranking: query expansion and database-side augmentation in one step.

Each vector is replaced by the normalised sum of itself and its ``n`` nearest neighbours in the
other catalogue, weighted by ``max(score, 0) ** alpha`` (alpha-QE of Radenovic et al.; on the
database side the same formula is DBA). A listing's vector moves towards the listings it already
resembles, which pulls several photos of one item together; the Shopee product-matching winners
credit a step like it with about +0.036 F1.
"""

from __future__ import annotations

import numpy as np
import torch


def expand(vectors: torch.Tensor, neighbours: torch.Tensor, indices: np.ndarray,
           scores: np.ndarray, *, n: int, alpha: float = 3.0) -> torch.Tensor:
    """Vectors moved towards their top-``n`` neighbours.

    Args:
        vectors: the unit vectors to expand.
        neighbours: the unit vectors ``indices`` point into.
        indices: each row's neighbours, best first (-1 = none).
        scores: their cosine similarities.
        n: how many neighbours to add (0 leaves the vectors as they are).
        alpha: weight exponent; larger trusts only close neighbours.

    Returns:
        Unit vectors of the same shape.

    Shape:
        - vectors: :math:`(N, D)`; neighbours: :math:`(M, D)`; indices, scores: :math:`(N, k)`
          with :math:`k \\ge n`.
    """
    if n < 0 or alpha < 0:
        raise ValueError(f"re-ranking needs n >= 0 and alpha >= 0; got n={n}, alpha={alpha}")
    if n == 0:
        return vectors
    if indices.shape[1] < n:
        raise ValueError(f"re-ranking with n={n} needs at least {n} neighbours per row; got "
                         f"{indices.shape[1]}")
    top = torch.from_numpy(indices[:, :n].copy())  # N x n
    weight = torch.from_numpy(np.clip(np.nan_to_num(scores[:, :n], neginf=0.0), 0, None)
                              ).float() ** alpha  # N x n
    weight = weight.masked_fill(top < 0, 0.0)
    gathered = neighbours[top.clamp(min=0)]  # N x n x D
    moved = vectors + torch.einsum("nk,nkd->nd", weight, gathered)
    return torch.nn.functional.normalize(moved, dim=1)
