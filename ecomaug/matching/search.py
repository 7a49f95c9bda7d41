"""Nearest neighbours of one catalogue in another: exact chunked search, or a faiss index.

The rule (``method="auto"``): a database of up to ``exact_limit`` vectors is searched exactly, in
chunks on the device (:func:`ecomaug.evaluation.retrieval.retrieve`); above it, an IVF-Flat
index with ``nlist = sqrt(N)`` lists (rounded to a power of two, 16 .. 65536; faiss suggests up
to 16 sqrt(N), but on a CPU fewer lists train and fill much faster and the probe depth below
keeps the recall) is trained on a seeded sample of ``min(N, 64 * nlist)`` vectors, and
``nprobe`` is doubled from 8 until recall@k against exact search, measured on a sample of
queries, reaches ``recall_target`` (0.95). ``method="hnsw"``
builds HNSW32 instead (no training, more memory). With a memory budget (``max_index_memory``,
``match --max-index-memory``) a database whose vectors (``4 N D`` bytes) exceed it, or ``exact_limit``,
gets the most accurate index that fits instead (:mod:`ecomaug.matching.index`: HNSW, IVF-Flat,
IVF-PQ or OPQ + IVF-PQ), its nprobe tuned the same way, a PQ index's candidates re-scored exactly.
The index is saved with the outputs and reused when the database is the same (same keys, same
shape) and, for a budgeted one, the budget too. ``index_on_disk`` (``match --index-on-disk``, with a
budget) keeps an IVF index's lists in a file beside it (:mod:`ecomaug.matching.ondisk`), the budget
then bounding what stays in RAM. On a CUDA ``device`` with a faiss that has GPU support, the index
trains its k-means and searches on that GPU (:mod:`ecomaug.matching.gpu`); the saved index is the
CPU copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ecomaug.limits import EXACT_LIMIT, SEARCH_METHODS as METHODS  # torch-free, for `match --help`
from ecomaug.matching.gpu import faiss_gpu, search_copy, train_ivf
from ecomaug.matching.index import (IndexPlan, build_within_budget, faiss_module as _faiss, ivf_lists,
                                    plan_index, rescore)
from ecomaug.matching.ondisk import lists_path, read_on_disk
from loaders.atomic import write_json_atomic

RECALL_SAMPLE = 500
# exact_search normalises the database a block of at most this many bytes at a time (retrieve()
# normalises what it is given: the whole database would be copied once more).
EXACT_BLOCK_BYTES = 2**28
# A PQ index's candidates re-scored exactly: max(RESCORE_FACTOR * k, RESCORE_MIN) a query to begin
# with; tuning doubles them with nprobe (PQ's error, not the lists probed, is then what loses
# neighbours) up to RESCORE_MAX.
RESCORE_FACTOR, RESCORE_MIN, RESCORE_MAX = 4, 40, 2048


@dataclass
class SearchResult:
    """The ``k`` best database rows of every query, best first.

    Attributes:
        scores: cosine similarities (``-inf`` where there is no neighbour).
        indices: database rows (-1 where there is none).
        method: ``"exact"``, ``"ivf"``, ``"hnsw"`` or ``"budget"`` (chosen by a memory budget).
        info: for an index: its parameters (``kind``: the faiss factory string), ``recall_vs_exact``
            (recall@k of the index against exact search on a query sample), build/search seconds,
            queries/s, whether reused; with a budget also ``index_type``, ``index_bytes`` (the
            serialised index), ``max_index_memory`` and ``rescored`` (candidates re-scored exactly).

    Shape:
        - scores, indices: :math:`(Q, k)`.
    """

    scores: np.ndarray
    indices: np.ndarray
    method: str
    info: dict[str, Any] = field(default_factory=dict)


def fingerprint(keys: Sequence[str], vectors: torch.Tensor) -> str:
    """What identifies a database for index reuse: its keys, shape and a checksum of its rows."""
    digest = hashlib.sha1(f"{tuple(vectors.shape)}".encode())
    for key in keys:
        digest.update(key.encode("utf-8") + b"\0")
    digest.update(np.ascontiguousarray(vectors[:: max(1, len(keys) // 1000)].numpy()).tobytes())
    return digest.hexdigest()


def exact_search(query: torch.Tensor, database: torch.Tensor, *, k: int,
                 device: torch.device | None = None, query_chunk: int = 1024,
                 gallery_chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k in chunks (memory about ``query_chunk x gallery_chunk`` floats, plus
    one block of the database of at most ``EXACT_BLOCK_BYTES``, normalised, never all of it).

    Returns:
        ``(scores, indices)``, each :math:`(Q, k)`.
    """
    from ecomaug.evaluation.retrieval import retrieve

    device = device or torch.device("cpu")
    query = query.to(device)
    block = max(gallery_chunk, EXACT_BLOCK_BYTES // (4 * max(1, database.shape[1])))
    scores = indices = None
    for start in range(0, max(1, database.shape[0]), block):  # an empty one: retrieve() says so
        part = database[start:start + block]
        # retrieve() ranks by item; one shared gallery label that no query carries makes it a plain
        # top-k search with no relevance bookkeeping.
        result = retrieve(query, [1] * query.shape[0], part, [0] * part.shape[0], depth=k, compute_map=False,
                          query_chunk=query_chunk, gallery_chunk=gallery_chunk)
        found = np.where(result.topk_indices >= 0, result.topk_indices + start, -1)
        if scores is None:
            scores, indices = result.topk_scores, found
            continue
        both = np.concatenate([scores, result.topk_scores], axis=1)
        order = np.argsort(-both, axis=1, kind="stable")[:, :k]  # earlier rows first on a tie
        scores = np.take_along_axis(both, order, axis=1)
        indices = np.take_along_axis(np.concatenate([indices, found], axis=1), order, axis=1)
    return scores, indices


def check_index_options(method: str, max_index_memory: int | None, on_disk: bool) -> None:
    """Refuse a search method that is not one of ``METHODS``, a budget with a method other than
    ``auto`` (the budget chooses the index) and on-disk lists without a budget (ValueError, one line)."""
    if method not in METHODS:
        raise ValueError(f"search method must be one of {METHODS}; got {method!r}")
    if on_disk and max_index_memory is None:
        raise ValueError("--index-on-disk needs --max-index-memory (the RAM the index may keep beside its lists)")
    if max_index_memory is not None and method != "auto":
        raise ValueError(f"--max-index-memory chooses the index itself: give it with --index auto, "
                         f"not --index {method}")


def choose_method(num_vectors: int, *, method: str = "auto", exact_limit: int = EXACT_LIMIT,
                  dim: int = 0, max_index_memory: int | None = None, on_disk: bool = False) -> str:
    """Apply the rule: ``exact`` up to ``exact_limit`` vectors, else ``ivf``; with a budget,
    ``budget`` (an index chosen by it) unless the vectors fit it and ``exact_limit`` both.

    Args:
        num_vectors: database vectors.
        method: ``auto``, ``exact``, ``ivf`` or ``hnsw``; a budget needs ``auto``.
        exact_limit: auto's largest database searched exactly.
        dim: their dimension (with a budget).
        max_index_memory: the budget in bytes, or None.
        on_disk: the index keeps its lists on disk (needs a budget).

    Raises:
        ValueError: an unknown method, a budget with a method other than ``auto``, or on-disk
            lists without a budget.
    """
    check_index_options(method, max_index_memory, on_disk)
    if max_index_memory is not None:
        fits = num_vectors * dim * 4 <= max_index_memory
        return "exact" if fits and num_vectors <= exact_limit else "budget"
    if method != "auto":
        return method
    return "exact" if num_vectors <= exact_limit else "ivf"


def _build(vectors: np.ndarray, method: str, seed: int, gpu: int | None) -> tuple[Any, dict[str, Any]]:
    faiss = _faiss()
    count, dim = vectors.shape
    if method == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.add(vectors)
        return index, {"kind": "HNSW32", "efConstruction": 80}
    nlist = min(ivf_lists(count), max(1, count // 39))  # faiss wants >= 39 training points a list
    index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    sample = min(count, 64 * nlist)
    rows = np.random.default_rng(seed).choice(count, size=sample, replace=False)
    train_ivf(faiss, index, vectors[np.sort(rows)], gpu)
    index.add(vectors)
    return index, {"kind": f"IVF{nlist},Flat", "nlist": nlist, "train_sample": int(sample)}


def _set_probe(index: Any, info: dict[str, Any], value: int) -> None:
    if "nlist" in info:
        _faiss().extract_index_ivf(index).nprobe = value
        info["nprobe"] = value
    else:
        index.hnsw.efSearch = value
        info["efSearch"] = value


def _index_search(index: Any, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores, indices = index.search(query, k)
    scores = np.where(indices >= 0, scores, -np.inf).astype(np.float32)
    return scores, indices.astype(np.int64)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the exact top-k that the index's top-k holds."""
    hits = sum(len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth))
    total = int((truth >= 0).sum())
    return hits / total if total else 1.0


def _saved_index(saved: Path | None, database_id: str | None, method: str, budget: int | None = None,
                 plans: Sequence[IndexPlan] = (), on_disk: bool = False) -> tuple[Any, dict[str, Any]]:
    """The index saved at ``saved`` for this database and method (and budget, and one of the
    plans that fit it, its lists on disk or not as asked), or ``(None, {})``.

    Raises:
        ValueError: an on-disk index whose lists file is missing or another's (one line).
    """
    if saved is None or database_id is None or not (saved.with_suffix(".json").is_file() and saved.is_file()):
        return None, {}
    recorded = json.loads(saved.with_suffix(".json").read_text(encoding="utf-8"))
    if recorded.get("database_id") != database_id or recorded.get("method") != method:
        return None, {}
    if budget is not None and (recorded.get("max_index_memory") != budget
                               or recorded.get("kind") not in {plan.factory for plan in plans}):
        return None, {}
    if bool(recorded.get("on_disk")) != on_disk:
        return None, {}
    index = read_on_disk(saved, recorded) if on_disk else _faiss().read_index(str(saved))
    return index, {**recorded, "reused": True}


def _searcher(index: Any, info: dict[str, Any], base: np.ndarray, k: int
              ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Queries -> the index's top-k; a PQ index's wider candidate list re-scored exactly."""
    if not info.get("rescored"):
        return lambda queries: _index_search(index, queries, k)
    width = min(base.shape[0], max(k, info.get("rescored_candidates", max(RESCORE_FACTOR * k, RESCORE_MIN))))
    info["rescored_candidates"] = width
    return lambda queries: rescore(queries, base, _index_search(index, queries, width)[1], k)


def _tune_probe(index: Any, info: dict[str, Any], query: torch.Tensor, queries: np.ndarray,
                exact: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]],
                base: np.ndarray, k: int, *, recall_target: float, seed: int
                ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Grow IVF's nprobe (HNSW's efSearch; and a PQ index's re-scored candidates) until recall@k
    against exact search on a query sample reaches ``recall_target`` or the ceiling; ``info``
    records the values and the recall. Returns the search so tuned."""
    rows = np.sort(np.random.default_rng(seed + 1).choice(
        queries.shape[0], size=min(RECALL_SAMPLE, queries.shape[0]), replace=False))
    _, truth = exact(query[rows])
    probe, ceiling = (8, info["nlist"]) if "nlist" in info else (32, 4096)
    width = min(base.shape[0], max(RESCORE_FACTOR * k, RESCORE_MIN))
    while True:
        _set_probe(index, info, min(probe, ceiling))
        if info.get("rescored"):
            info["rescored_candidates"] = width
        find = _searcher(index, info, base, k)
        _, found = find(queries[rows])
        info["recall_vs_exact"] = _recall(found, truth)
        info["recall_sample"] = int(len(rows))
        wider = info.get("rescored") and width < min(RESCORE_MAX, base.shape[0])
        if info["recall_vs_exact"] >= recall_target or (probe >= ceiling and not wider):
            return find
        probe *= 2
        width = min(2 * width, RESCORE_MAX, base.shape[0]) if info.get("rescored") else width


def _save_index(index: Any, info: dict[str, Any], saved: Path) -> None:
    """The index at ``saved`` and what it was built for beside it (``.json``), for :func:`_saved_index`."""
    saved.parent.mkdir(parents=True, exist_ok=True)
    _faiss().write_index(index, str(saved))
    if not info.get("on_disk"):
        lists_path(saved).unlink(missing_ok=True)  # an earlier on-disk index's lists, replaced by this one
    write_json_atomic(saved.with_suffix(".json"), {key: info[key] for key in info if key != "reused"})


def _index_searcher(query: torch.Tensor, queries: np.ndarray, base: np.ndarray, k: int, chosen: str,
                    exact: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]], *,
                    index_path: str | os.PathLike | None, database_id: str | None, recall_target: float,
                    seed: int, device: torch.device | None, max_index_memory: int | None, on_disk: bool
                    ) -> tuple[Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """The saved index reused, or one built, tuned and saved; its search (on the GPU where
    :mod:`ecomaug.matching.gpu` allows) and its info."""
    saved = Path(index_path) if index_path is not None else None
    if on_disk and saved is None:
        raise ValueError("an index with its lists on disk needs index_path (the folder its files go to)")
    plans = plan_index(*base.shape, max_index_memory, on_disk=on_disk) if chosen == "budget" else []
    index, info = _saved_index(saved, database_id, chosen, max_index_memory, plans, on_disk)
    gpu = faiss_gpu(_faiss(), device)
    if index is None:
        started = time.perf_counter()
        if chosen == "budget":
            index, info = build_within_budget(base, plans, max_index_memory, seed=seed, gpu=gpu,
                                              lists_file=lists_path(saved) if on_disk else None)
            info["max_index_memory"] = max_index_memory
        else:
            index, info = _build(base, chosen, seed, gpu)
        info.update(method=chosen, database_id=database_id, build_seconds=time.perf_counter() - started,
                    reused=False)
        _tune_probe(index, info, query, queries, exact, base, k, recall_target=recall_target, seed=seed)
        if saved is not None:
            _save_index(index, info, saved)
    else:
        _set_probe(index, info, info.get("nprobe", info.get("efSearch", 8)))
    # nprobe is tuned on the CPU index; the GPU copy takes it with the lists
    searched, info["faiss_device"] = search_copy(_faiss(), index, gpu, on_disk=on_disk,
                                                 family=info.get("index_type", info["kind"]))
    return _searcher(searched, info, base, k), info


def search(query: torch.Tensor, database: torch.Tensor, *, k: int, method: str = "auto",
           exact_limit: int = EXACT_LIMIT, index_path: str | os.PathLike | None = None,
           database_id: str | None = None, recall_target: float = 0.95, seed: int = 0,
           device: torch.device | None = None, query_chunk: int = 1024,
           gallery_chunk: int = 65536, max_index_memory: int | None = None,
           index_on_disk: bool = False) -> SearchResult:
    """The ``k`` nearest database rows of every query by cosine (rows must be unit vectors).

    Args:
        query: unit query vectors (CPU).
        database: unit database vectors (CPU).
        k: neighbours per query.
        method: ``auto`` (the module's rule), ``exact``, ``ivf`` or ``hnsw``.
        exact_limit: auto's largest database searched exactly.
        index_path: where the index is saved (``.faiss`` + ``.json``) and reused from.
        database_id: :func:`fingerprint` of the database; an index saved for another is rebuilt.
        recall_target: IVF's nprobe (HNSW's efSearch) grows until recall@k against exact search
            on a query sample reaches this.
        seed: seeds the training sample and the query sample.
        device: where exact search runs (and faiss, on CUDA with faiss GPU support).
        query_chunk: exact search: queries per chunk.
        gallery_chunk: exact search: database rows per chunk.
        max_index_memory: a budget in bytes for the index (``method`` auto): see
            :func:`choose_method` and :mod:`ecomaug.matching.index`.
        index_on_disk: with a budget: the index's inverted lists in a file beside ``index_path``
            (``.ivfdata``), the budget bounding the index file (:mod:`ecomaug.matching.ondisk`).

    Raises:
        ValueError: bad k, method or shapes; a budget no index fits; on-disk lists without a
            budget or ``index_path``, or a saved index's lists file missing or another's.
            ImportError: an index without faiss.
    """
    if query.ndim != 2 or database.ndim != 2 or query.shape[1] != database.shape[1]:
        raise ValueError(f"query {tuple(query.shape)} and database {tuple(database.shape)} must be "
                         "N x D with one D")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if database.shape[0] == 0:
        raise ValueError("the database is empty")
    chosen = choose_method(database.shape[0], method=method, exact_limit=exact_limit,
                           dim=database.shape[1], max_index_memory=max_index_memory, on_disk=index_on_disk)
    if chosen == "exact":
        started = time.perf_counter()
        scores, indices = exact_search(query, database, k=k, device=device,
                                       query_chunk=query_chunk, gallery_chunk=gallery_chunk)
        seconds = time.perf_counter() - started
        return SearchResult(scores, indices, "exact",
                            {"search_seconds": seconds,
                             "queries_per_second": query.shape[0] / max(seconds, 1e-9)})
    base = np.ascontiguousarray(database.float().numpy())
    queries = np.ascontiguousarray(query.float().numpy())
    k_index = min(k, base.shape[0])
    exact = partial(exact_search, database=database, k=k_index, device=device, query_chunk=query_chunk,
                    gallery_chunk=gallery_chunk)
    find, info = _index_searcher(query, queries, base, k_index, chosen, exact, index_path=index_path,
                                 database_id=database_id, recall_target=recall_target, seed=seed, device=device,
                                 max_index_memory=max_index_memory, on_disk=index_on_disk)
    started = time.perf_counter()
    scores, indices = find(queries)
    seconds = time.perf_counter() - started
    if k_index < k:
        scores = np.pad(scores, ((0, 0), (0, k - k_index)), constant_values=-np.inf)
        indices = np.pad(indices, ((0, 0), (0, k - k_index)), constant_values=-1)
    info.update(search_seconds=seconds, queries_per_second=query.shape[0] / max(seconds, 1e-9),
                recall_k=k_index)
    return SearchResult(scores, indices, chosen, info)
