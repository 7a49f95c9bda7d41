"""Item-matching retrieval: exact cosine top-k in chunks, recall@k and mAP by ``item_id``.

Queries are matched against a gallery by cosine similarity. A gallery entry is *relevant* to a
query when it has the same ``item_id``. The similarity matrix is never held whole: queries and
gallery are walked in chunks on the embeddings' device, keeping a running top-k, so memory stays
bounded (about ``query_chunk x gallery_chunk`` floats) for millions of gallery items.

mAP is exact under the torch backend: the scores of a query's relevant entries are gathered
first, then every gallery chunk adds how many non-relevant entries score above each of them.
With ``backend="faiss"`` (when installed) only the top ``map_depth`` neighbours are searched and
relevant entries beyond that depth add zero precision, so its mAP is a lower bound (``mAP@depth``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ecomaug.evaluation.chunked_search import search_faiss, search_torch

BACKENDS = ("torch", "faiss")


@dataclass
class RetrievalResult:
    """Per-query outcome of one retrieval.

    Attributes:
        topk_indices: gallery positions of the best ``depth`` matches, best first (-1 = none).
        topk_scores: their cosine similarities (``-inf`` where there is none).
        first_hit_rank: 1-based rank of the first relevant gallery entry within the searched
            depth; 0 when none was found there.
        average_precision: AP of each query over the whole ranking (NaN without relevant entries).
        has_relevant: whether the gallery holds any relevant entry for the query at all.
        map_exact: False when AP was computed only over the top ``map_depth`` (faiss backend).

    Shape:
        - topk_indices, topk_scores: :math:`(Q, depth)`; the others :math:`(Q,)`.
    """

    topk_indices: np.ndarray
    topk_scores: np.ndarray
    first_hit_rank: np.ndarray
    average_precision: np.ndarray
    has_relevant: np.ndarray
    map_exact: bool = True


def _check_inputs(query_emb: torch.Tensor, query_items: Sequence[Any], gallery_emb: torch.Tensor,
                  gallery_items: Sequence[Any]) -> None:
    if query_emb.ndim != 2 or gallery_emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N x D); got query {tuple(query_emb.shape)} and "
                         f"gallery {tuple(gallery_emb.shape)}")
    if query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(f"query and gallery embeddings differ in width: {query_emb.shape[1]} vs "
                         f"{gallery_emb.shape[1]}")
    if len(query_items) != query_emb.shape[0]:
        raise ValueError(f"{len(query_items)} query item ids for {query_emb.shape[0]} query embeddings")
    if len(gallery_items) != gallery_emb.shape[0]:
        raise ValueError(f"{len(gallery_items)} gallery item ids for {gallery_emb.shape[0]} gallery "
                         "embeddings")
    if gallery_emb.shape[0] == 0:
        raise ValueError("the gallery is empty")


def encode_labels(query_values: Sequence[Any], gallery_values: Sequence[Any]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Map arbitrary hashable labels to shared integer codes (-1: a query label the gallery lacks).

    Returns:
        ``(query_codes, gallery_codes)``, int64 arrays of shapes :math:`(Q,)` and :math:`(G,)`.
    """
    codes: dict[Any, int] = {}
    gallery_codes = np.array([codes.setdefault(value, len(codes)) for value in gallery_values],
                             dtype=np.int64)
    query_codes = np.array([codes.get(value, -1) for value in query_values], dtype=np.int64)
    return query_codes, gallery_codes


def _relevant_positions(query_codes: np.ndarray, gallery_codes: np.ndarray,
                        excluded: np.ndarray) -> list[np.ndarray]:
    """Gallery positions relevant to each query (same item, not excluded)."""
    by_item: dict[int, list[int]] = defaultdict(list)
    for position, code in enumerate(gallery_codes.tolist()):
        by_item[code].append(position)
    relevant = []
    for query, code in enumerate(query_codes.tolist()):
        positions = np.array(by_item.get(code, []), dtype=np.int64)
        if excluded[query] >= 0:
            positions = positions[positions != excluded[query]]
        relevant.append(positions)
    return relevant


def _excluded_positions(query_keys: Sequence[Any] | None, gallery_keys: Sequence[Any] | None,
                        num_queries: int) -> np.ndarray:
    """For each query, the gallery position holding the same key (-1 when none)."""
    excluded = np.full(num_queries, -1, dtype=np.int64)
    if query_keys is None or gallery_keys is None:
        return excluded
    if len(query_keys) != num_queries:
        raise ValueError(f"{len(query_keys)} query keys for {num_queries} queries")
    position_of: dict[Any, int] = {}
    for position, key in enumerate(gallery_keys):
        if key in position_of:
            raise ValueError(f"gallery key {key!r} appears twice; keys must be unique to exclude a "
                             "query's own entry")
        position_of[key] = position
    for query, key in enumerate(query_keys):
        excluded[query] = position_of.get(key, -1)
    return excluded


def ranking_average_precision(hits: torch.Tensor, relevant_counts: torch.Tensor) -> torch.Tensor:
    """AP of each query from its ranking: the mean of the precision at every relevant rank.

    Args:
        hits: whether the entry at each rank is relevant, best rank first.
        relevant_counts: relevant entries of each query in the whole gallery (more than ``hits``
            shows when the ranking is cut short: the missing ones add zero precision).

    Returns:
        float64 AP per query, NaN where a query has no relevant entry.

    Shape:
        - hits: :math:`(Q, N)`; relevant_counts and output: :math:`(Q,)`.
    """
    hits = hits.to(torch.float64)
    counts = relevant_counts.to(torch.float64)
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)
    precision = hits.cumsum(dim=1) / ranks  # Q x N
    return torch.where(counts > 0, (precision * hits).sum(dim=1) / counts.clamp(min=1),
                       torch.full_like(counts, float("nan")))


def first_hit_ranks(topk_indices: np.ndarray, query_codes: np.ndarray, gallery_codes: np.ndarray) -> np.ndarray:
    """1-based rank of each query's first relevant entry among ``topk_indices`` (0: none there).

    Shape:
        - topk_indices: :math:`(Q, depth)`, -1 where there is none; output: :math:`(Q,)`.
    """
    hits = (topk_indices >= 0) & (gallery_codes[np.maximum(topk_indices, 0)] == query_codes[:, None])
    return np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)


def retrieve(query_emb: torch.Tensor, query_items: Sequence[Any], gallery_emb: torch.Tensor,
             gallery_items: Sequence[Any], *, depth: int = 10,
             query_keys: Sequence[Any] | None = None, gallery_keys: Sequence[Any] | None = None,
             backend: str = "torch", compute_map: bool = True, map_depth: int = 100,
             query_chunk: int = 1024, gallery_chunk: int = 65536,
             progress: bool = False) -> RetrievalResult:
    """Rank the gallery for every query by cosine similarity.

    Embeddings are L2-normalised here; the search runs on ``query_emb``'s device.

    Args:
        query_emb: query embeddings.
        query_items: the ``item_id`` of each query.
        gallery_emb: gallery embeddings (moved to the query's device).
        gallery_items: the ``item_id`` of each gallery entry.
        depth: how many neighbours to keep per query (the largest k of recall@k).
        query_keys: sample keys of the queries; with ``gallery_keys``, a gallery entry with the
            query's own key is skipped (leave-one-out when the query set is the gallery).
        gallery_keys: sample keys of the gallery (must be unique when given with query_keys).
        backend: ``"torch"`` (exact, chunked) or ``"faiss"`` (``IndexFlatIP``; faiss needed).
        compute_map: compute average precision (one extra comparison pass per chunk).
        map_depth: faiss backend only: how deep to search to estimate AP.
        query_chunk: queries per chunk.
        gallery_chunk: gallery entries per chunk; memory is about
            ``query_chunk x gallery_chunk`` floats.
        progress: show a tqdm bar over query chunks.

    Returns:
        A :class:`RetrievalResult`.

    Shape:
        - query_emb: :math:`(Q, D)`, gallery_emb: :math:`(G, D)`.

    Raises:
        ValueError: for mismatched shapes or lengths, an empty gallery, a bad depth or backend.
    """
    _check_inputs(query_emb, query_items, gallery_emb, gallery_items)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1; got {depth}")
    if query_chunk < 1 or gallery_chunk < 1:
        raise ValueError(f"chunk sizes must be >= 1; got query_chunk={query_chunk}, "
                         f"gallery_chunk={gallery_chunk}")
    num_queries = query_emb.shape[0]
    query = torch.nn.functional.normalize(query_emb.float(), dim=1)
    gallery = torch.nn.functional.normalize(gallery_emb.float().to(query.device), dim=1)
    query_codes, gallery_codes = encode_labels(query_items, gallery_items)
    excluded = _excluded_positions(query_keys, gallery_keys, num_queries)
    relevant = _relevant_positions(query_codes, gallery_codes, excluded)
    has_relevant = np.array([len(r) > 0 for r in relevant], dtype=bool)
    map_exact = True
    if backend == "torch":
        indices_t, scores_t, ap_t = search_torch(
            query, gallery, torch.from_numpy(query_codes).to(query.device),
            torch.from_numpy(gallery_codes).to(query.device),
            torch.from_numpy(excluded).to(query.device), relevant, depth, query_chunk,
            gallery_chunk, compute_map, progress)
        indices, scores = indices_t.numpy(), scores_t.numpy()
        average_precision = ap_t.numpy()
    else:
        search_depth = max(depth, map_depth) if compute_map else depth
        indices, scores = search_faiss(query, gallery, excluded, search_depth)
        average_precision = np.full(num_queries, np.nan)
        if compute_map:
            map_exact = False
            hits = (indices >= 0) & (gallery_codes[np.maximum(indices, 0)] == query_codes[:, None])
            counts = torch.tensor([len(r) for r in relevant])
            average_precision = ranking_average_precision(torch.from_numpy(hits), counts).numpy()
        indices, scores = indices[:, :depth], scores[:, :depth]
    return RetrievalResult(topk_indices=indices, topk_scores=scores,
                           first_hit_rank=first_hit_ranks(indices, query_codes, gallery_codes),
                           average_precision=average_precision, has_relevant=has_relevant,
                           map_exact=map_exact)


def summarize(result: RetrievalResult, *, ks: Sequence[int] = (1, 5, 10),
              groups: Mapping[str, Sequence[Any]] | None = None) -> dict[str, Any]:
    """Recall@k and mAP over the queries that have a relevant gallery entry, plus per group.

    Recall@k is the fraction of queries whose top k holds at least one gallery entry of the same
    item; queries whose item is absent from the gallery are counted in ``num_without_relevant``
    and left out of every mean.

    Args:
        result: the output of :func:`retrieve`.
        ks: the k of recall@k (each at most the retrieval depth).
        groups: ``{column: value per query}``, e.g. ``{"region": [...]}``; each column gets a
            ``{value: metrics}`` breakdown under ``"groups"``.

    Returns:
        ``{"recall@1": ..., "mAP": ..., "num_queries": ..., "num_without_relevant": ...,
        "map_exact": ..., "groups": {column: {value: {...}}}}``.
    """
    depth = result.topk_indices.shape[1]
    for k in ks:
        if not 1 <= k <= depth:
            raise ValueError(f"recall@{k} needs 1 <= k <= the retrieval depth ({depth})")

    def metrics(mask: np.ndarray) -> dict[str, Any]:
        usable = mask & result.has_relevant
        count = int(usable.sum())
        out: dict[str, Any] = {}
        for k in ks:
            found = (result.first_hit_rank[usable] >= 1) & (result.first_hit_rank[usable] <= k)
            out[f"recall@{k}"] = float(found.mean()) if count else float("nan")
        ap = result.average_precision[usable]
        out["mAP"] = float(np.nanmean(ap)) if count and not np.isnan(ap).all() else float("nan")
        out["num_queries"] = count
        out["num_without_relevant"] = int((mask & ~result.has_relevant).sum())
        return out

    everything = np.ones(result.first_hit_rank.shape[0], dtype=bool)
    summary = metrics(everything)
    summary["map_exact"] = result.map_exact
    summary["groups"] = {}
    for column, values in (groups or {}).items():
        if len(values) != everything.shape[0]:
            raise ValueError(f"group {column!r} has {len(values)} values for "
                             f"{everything.shape[0]} queries")
        labels = np.array([str(value) for value in values])
        summary["groups"][column] = {value: metrics(labels == value)
                                     for value in sorted(set(labels.tolist()))}
    return summary


def retrieval_metrics(query_emb: torch.Tensor, query_items: Sequence[Any],
                      gallery_emb: torch.Tensor, gallery_items: Sequence[Any], *,
                      ks: Sequence[int] = (1, 5, 10), exclude_same_key: bool = False,
                      query_keys: Sequence[Any] | None = None,
                      gallery_keys: Sequence[Any] | None = None,
                      groups: Mapping[str, Sequence[Any]] | None = None,
                      backend: str = "torch", compute_map: bool = True,
                      query_chunk: int = 1024, gallery_chunk: int = 65536) -> dict[str, Any]:
    """Recall@k and mAP of queries against a gallery, in one call (also the trainer's kNN monitor).

    Args:
        query_emb: query embeddings.
        query_items: the ``item_id`` of each query.
        gallery_emb: gallery embeddings.
        gallery_items: the ``item_id`` of each gallery entry.
        ks: the k of recall@k.
        exclude_same_key: skip the gallery entry with the query's own key. Needs ``query_keys``
            and ``gallery_keys``; when the query set *is* the gallery and keys are not given,
            positions are used as keys (leave-one-out).
        query_keys: sample keys of the queries.
        gallery_keys: sample keys of the gallery.
        groups: ``{column: value per query}`` for a per-group breakdown (e.g. region).
        backend: ``"torch"`` (exact, chunked on the embeddings' device) or ``"faiss"``.
        compute_map: also compute mAP.
        query_chunk: queries per chunk.
        gallery_chunk: gallery entries per chunk.

    Returns:
        See :func:`summarize`.

    Shape:
        - query_emb: :math:`(Q, D)`, gallery_emb: :math:`(G, D)`.

    Example:
        >>> emb = torch.eye(3)
        >>> retrieval_metrics(emb, ["a", "a", "b"], emb, ["a", "a", "b"], ks=(1,),
        ...                   exclude_same_key=True)["num_queries"]
        2
    """
    if not ks:
        raise ValueError("ks must name at least one k (e.g. (1, 5, 10))")
    if exclude_same_key:
        if query_keys is None and gallery_keys is None:
            if query_emb.shape[0] != gallery_emb.shape[0]:
                raise ValueError("exclude_same_key without keys needs the query set to be the "
                                 "gallery (same length); pass query_keys and gallery_keys")
            query_keys = gallery_keys = list(range(query_emb.shape[0]))
        elif query_keys is None or gallery_keys is None:
            raise ValueError("exclude_same_key needs both query_keys and gallery_keys")
    else:
        query_keys = gallery_keys = None
    if min(ks) < 1:
        raise ValueError(f"every k must be >= 1; got ks={tuple(ks)}")
    # A k beyond the gallery size is fine: the ranking is padded with empty slots.
    result = retrieve(query_emb, query_items, gallery_emb, gallery_items, depth=max(ks),
                      query_keys=query_keys, gallery_keys=gallery_keys, backend=backend,
                      compute_map=compute_map, query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    return summarize(result, ks=ks, groups=groups)
