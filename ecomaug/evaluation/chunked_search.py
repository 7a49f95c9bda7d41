"""The two searches behind :func:`ecomaug.evaluation.retrieval.retrieve`: exact and chunked, or faiss.

:func:`search_torch` walks queries and gallery in chunks on the embeddings' device, keeping a
running top-k, and computes each query's exact average precision on the way (the relevant
entries' scores first, then how many non-relevant entries score above each). :func:`search_faiss`
is ``IndexFlatIP`` (faiss needed) with the query's own entry dropped.
"""

from __future__ import annotations

import numpy as np
import torch


def exact_average_precision(relevant_scores: torch.Tensor, valid: torch.Tensor,
                            irrelevant_above: torch.Tensor) -> torch.Tensor:
    """AP from the relevant entries' scores and how many non-relevant entries beat each.

    Relevant scores are sorted best first; the i-th (1-based) sits at rank
    ``i + irrelevant_above[i]``, so its precision is ``i / (i + irrelevant_above[i])``.

    Shape:
        - relevant_scores, valid, irrelevant_above: :math:`(Q, P)` (sorted best first).
        - output: :math:`(Q,)`.
    """
    position = torch.cumsum(valid.to(torch.float64), dim=1)  # Q x P: i for valid entries
    precision = position / (position + irrelevant_above.to(torch.float64))
    precision = torch.where(valid, precision, torch.zeros_like(precision))
    count = valid.sum(dim=1).to(torch.float64)
    return torch.where(count > 0, precision.sum(dim=1) / count.clamp(min=1),
                       torch.full_like(count, float("nan")))


def count_above(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """How many entries of each row of ``scores`` are strictly greater than each threshold.

    Shape:
        - scores: :math:`(Q, G)`; thresholds: :math:`(Q, P)`; output :math:`(Q, P)` int64.
    """
    if thresholds.shape[1] <= 16:
        # A few comparisons over the chunk are cheaper than sorting it.
        # int32 sums run about twice as fast as the default int64 on CPU; a chunk fits in int32.
        return torch.stack([(scores > thresholds[:, [p]]).sum(dim=1, dtype=torch.int32)
                            for p in range(thresholds.shape[1])], dim=1).long()
    ordered, _ = torch.sort(scores, dim=1)
    not_above = torch.searchsorted(ordered, thresholds.contiguous(), right=True)
    return scores.shape[1] - not_above


def search_torch(query: torch.Tensor, gallery: torch.Tensor, query_codes: torch.Tensor,
                 gallery_codes: torch.Tensor, excluded: torch.Tensor,
                 relevant: list[np.ndarray], depth: int, query_chunk: int, gallery_chunk: int,
                 compute_map: bool, progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact cosine top-``depth`` of every query, in chunks, and each query's exact AP.

    Args:
        query, gallery: L2-normalised embeddings on one device.
        query_codes, gallery_codes: label codes (:func:`ecomaug.evaluation.retrieval.encode_labels`).
        excluded: each query's own gallery position, left out of its ranking (-1: none).
        relevant: each query's relevant gallery positions.
        depth: neighbours kept per query.
        query_chunk, gallery_chunk: chunk sizes; memory is about their product in floats.
        compute_map: also compute AP (one extra comparison pass per chunk).
        progress: a tqdm bar over query chunks.

    Returns:
        ``(topk_indices, topk_scores, average_precision)`` on the CPU (-1 / -inf where none; NaN AP
        without relevant entries or without ``compute_map``).

    Shape:
        - query: :math:`(Q, D)`, gallery: :math:`(G, D)`; outputs :math:`(Q, depth)` and :math:`(Q,)`.
    """
    num_queries, num_gallery = query.shape[0], gallery.shape[0]
    device = query.device
    topk_scores = torch.full((num_queries, depth), float("-inf"), device=device)
    topk_indices = torch.full((num_queries, depth), -1, dtype=torch.int64, device=device)
    average_precision = torch.full((num_queries,), float("nan"), dtype=torch.float64)
    starts = range(0, num_queries, query_chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="retrieval", unit="chunk")
    for start in starts:
        stop = min(start + query_chunk, num_queries)
        q = query[start:stop]  # Qc x D
        q_codes = query_codes[start:stop]  # Qc
        q_excluded = excluded[start:stop]  # Qc
        width = max((len(relevant[i]) for i in range(start, stop)), default=0)
        relevant_index = torch.zeros((stop - start, max(width, 1)), dtype=torch.int64)
        relevant_valid = torch.zeros((stop - start, max(width, 1)), dtype=torch.bool)
        for row, i in enumerate(range(start, stop)):
            relevant_index[row, :len(relevant[i])] = torch.from_numpy(relevant[i])
            relevant_valid[row, :len(relevant[i])] = True
        relevant_index, relevant_valid = relevant_index.to(device), relevant_valid.to(device)
        # Qc x P: scores of the relevant entries, best first, invalid ones pushed to the end.
        relevant_scores = torch.einsum("qd,qpd->qp", q, gallery[relevant_index])
        relevant_scores = relevant_scores.masked_fill(~relevant_valid, float("-inf"))
        relevant_scores, order = torch.sort(relevant_scores, dim=1, descending=True)
        relevant_valid = torch.gather(relevant_valid, 1, order)
        thresholds = relevant_scores.masked_fill(~relevant_valid, float("inf"))
        irrelevant_above = torch.zeros_like(relevant_index)
        best_scores, best_indices = topk_scores[start:stop], topk_indices[start:stop]
        rows = torch.arange(stop - start, device=device)  # Qc
        for g_start in range(0, num_gallery, gallery_chunk):
            g_stop = min(g_start + gallery_chunk, num_gallery)
            scores = q @ gallery[g_start:g_stop].T  # Qc x Gc
            # Masks are scattered at a few known positions, never built as Qc x Gc matrices.
            own = (q_excluded >= g_start) & (q_excluded < g_stop)  # Qc
            scores[rows[own], q_excluded[own] - g_start] = float("-inf")
            chunk_scores, chunk_positions = torch.topk(scores, k=min(depth, g_stop - g_start), dim=1)
            merged_scores = torch.cat([best_scores, chunk_scores], dim=1)  # Qc x (depth + k)
            merged_indices = torch.cat([best_indices, chunk_positions + g_start], dim=1)
            best_scores, pick = torch.topk(merged_scores, k=depth, dim=1)
            best_indices = torch.gather(merged_indices, 1, pick)
            if compute_map:
                local = relevant_index - g_start  # Qc x P
                inside = relevant_valid & (local >= 0) & (local < g_stop - g_start)
                scores[rows[:, None].expand_as(local)[inside], local[inside]] = float("-inf")
                irrelevant_above += count_above(scores, thresholds)
        best_indices = best_indices.masked_fill(torch.isinf(best_scores), -1)
        topk_scores[start:stop], topk_indices[start:stop] = best_scores, best_indices
        if compute_map:
            average_precision[start:stop] = exact_average_precision(
                relevant_scores, relevant_valid, irrelevant_above).cpu()
    return topk_indices.cpu(), topk_scores.cpu(), average_precision


def search_faiss(query: torch.Tensor, gallery: torch.Tensor, excluded: np.ndarray,
                 depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``depth`` by inner product with faiss' ``IndexFlatIP``, each query's own entry dropped.

    Returns:
        ``(indices, scores)``, :math:`(Q, depth)`, padded with -1 / -inf.

    Raises:
        ImportError: faiss is not installed (the message names the package and the alternative).
    """
    try:
        import faiss
    except ImportError as error:
        raise ImportError("backend='faiss' needs the faiss package (pip install faiss-cpu or "
                          "faiss-gpu); use backend='torch' for exact chunked search") from error
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery.float().cpu().numpy()))
    extra = 1 if (excluded >= 0).any() else 0  # room to drop the query's own entry
    search_depth = min(depth + extra, gallery.shape[0])
    scores, indices = index.search(np.ascontiguousarray(query.float().cpu().numpy()), search_depth)
    own = indices == excluded[:, None]
    scores[own], indices[own] = -np.inf, -1
    order = np.argsort(own, axis=1, kind="stable")  # keep rank order, own entry to the end
    scores = np.take_along_axis(scores, order, axis=1)[:, :depth]
    indices = np.take_along_axis(indices, order, axis=1)[:, :depth]
    if scores.shape[1] < depth:
        pad = depth - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        indices = np.pad(indices, ((0, 0), (0, pad)), constant_values=-1)
    return indices.astype(np.int64), scores.astype(np.float32)
