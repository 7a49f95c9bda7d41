"""An index under a memory budget (``match --max-index-memory``): which faiss index fits, its build.

As autofaiss chooses: the most accurate index whose estimated size fits the budget. HNSW32 for a
small catalogue; IVF-Flat (the vectors themselves, ``4 D`` bytes each plus an 8-byte id) while
they fit; else IVF-PQ with the largest number ``m`` of 8-bit sub-quantizers that fits (``N (m + 8)``
bytes of codes and ids, plus the coarse centroids and codebooks), with an OPQ rotation down to
``4 m`` dimensions first when the vectors are wider than that (each sub-quantizer then codes four
dimensions, and the rotation balances their variance). The index is built, serialised and
measured; one larger than the budget (the estimate was short) gives way to the next plan.

With ``on_disk`` (``match --index-on-disk``) the inverted lists go to a file beside the index
(:mod:`ecomaug.matching.ondisk`) and the budget bounds what stays in RAM: the coarse centroids,
the OPQ rotation, the PQ codebooks and each list's offset. Only IVF indexes have lists, so the plan
is then the most accurate IVF index (IVF-Flat unless its centroids alone exceed the budget).

PQ codes only approximate the cosine, so the candidates a PQ index returns are re-scored exactly
against the vectors ``match`` holds anyway (:func:`rescore`): the index on disk stays within the
budget, and the scores downstream (thresholds, the normalised score) stay true cosines.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ecomaug.matching.gpu import train_ivf
from ecomaug.matching.ondisk import add_on_disk, lists_record

# Up to this many vectors HNSW32 comes first (autofaiss's quantization threshold): no training,
# and its memory (the vectors plus ~70 links each) is small at this size.
HNSW_LIMIT = 10_000
# Sub-quantizers per vector tried, most accurate first (8 bits each: m bytes of code a vector).
PQ_SIZES = (256, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4)
ID_BYTES = 8  # faiss's inverted lists store an int64 id beside each code
HEADER_BYTES = 8 * 1024  # the serialised index's fixed parts (measured: ~1.3K), generously
ON_DISK_LIST_BYTES = 24  # an on-disk list's size, capacity and offset, kept in the index file
HNSW_LINK_BYTES = 280  # 2 x 32 int32 links at level 0, the upper levels, offsets and levels
PQ_FAMILIES = ("IVF-PQ", "OPQ+IVF-PQ")
# OPQ's alternating rotation / PQ iterations (faiss's default 50 took 45 s for 10^4 x 64 on two
# loaded cores; the gain flattens after ~10-20, and nprobe is tuned on the result anyway).
OPQ_ITERATIONS = 16
# Vectors added to an index at a time: an OPQ rotation then copies one chunk, not the database,
# and a progress bar can show the add (minutes at 10^7 vectors).
ADD_CHUNK = 2**18


@dataclass(frozen=True)
class IndexPlan:
    """One candidate index for a database of ``count x dim`` vectors.

    Attributes:
        factory: the ``faiss.index_factory`` string, e.g. ``"OPQ16_64,IVF512,PQ16x8"``.
        family: ``"HNSW"``, ``"IVF-Flat"``, ``"IVF-PQ"`` or ``"OPQ+IVF-PQ"``.
        estimated_bytes: its size, serialised, as estimated before building it.
        nlist: inverted lists (0 for HNSW).
        pq_m: 8-bit sub-quantizers a vector (0 without PQ).
        on_disk: its inverted lists go to a file; ``estimated_bytes`` is then the index file
            (what stays in RAM), not the lists.
    """

    factory: str
    family: str
    estimated_bytes: int
    nlist: int = 0
    pq_m: int = 0
    on_disk: bool = False

    @property
    def rescored(self) -> bool:
        """Whether its scores are approximate, so its candidates are re-scored exactly."""
        return self.family in PQ_FAMILIES


def ivf_lists(num_vectors: int) -> int:
    """``nlist`` of the rule: sqrt(N) rounded to a power of two, within 16 .. 65536."""
    return int(min(65536, max(16, 2 ** round(math.log2(math.sqrt(max(num_vectors, 1)))))))


def human_bytes(size: int) -> str:
    """``size`` in the units ``--max-index-memory`` takes (``33554432`` -> ``"32.0M"``)."""
    for unit, scale in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size >= scale:
            return f"{size / scale:.1f}{unit}"
    return f"{size}B"


def _overhead(nlist: int, on_disk: bool = False) -> int:
    return HEADER_BYTES + (ON_DISK_LIST_BYTES if on_disk else 16) * nlist  # each list's size and offset


def plans_for(count: int, dim: int, *, on_disk: bool = False) -> list[IndexPlan]:
    """Every candidate index for ``count x dim`` vectors, most accurate first; with ``on_disk``
    only IVF ones, each sized without its lists (they go to a file)."""
    nlist = min(ivf_lists(count), max(1, count // 39))  # faiss wants >= 39 training points a list
    listed = 0 if on_disk else count  # the entries of the lists, counted in RAM
    plans = []
    if count <= HNSW_LIMIT and not on_disk:
        plans.append(IndexPlan("HNSW32", "HNSW", count * (4 * dim + HNSW_LINK_BYTES) + HEADER_BYTES))
    plans.append(IndexPlan(f"IVF{nlist},Flat", "IVF-Flat", listed * (4 * dim + ID_BYTES) + nlist * 4 * dim
                           + _overhead(nlist, on_disk), nlist, on_disk=on_disk))
    for m in PQ_SIZES:
        if m <= dim and dim % m == 0 and dim <= 4 * m:
            coded, factory, family, rotation = dim, f"IVF{nlist},PQ{m}x8", "IVF-PQ", 0
        elif 4 * m < dim:
            coded, factory, family = 4 * m, f"OPQ{m}_{4 * m},IVF{nlist},PQ{m}x8", "OPQ+IVF-PQ"
            rotation = 4 * coded * dim
        else:
            continue
        # codes and ids; coarse centroids; m codebooks of 256 centroids of coded / m dims
        size = listed * (m + ID_BYTES) + nlist * 4 * coded + 256 * 4 * coded + rotation + _overhead(nlist, on_disk)
        plans.append(IndexPlan(factory, family, size, nlist, m, on_disk))
    return plans


def plan_index(count: int, dim: int, budget: int, *, on_disk: bool = False) -> list[IndexPlan]:
    """The candidate indexes whose estimated size fits ``budget`` bytes, most accurate first.

    Args:
        count: database vectors.
        dim: their dimension.
        budget: the most bytes the serialised index may take (with ``on_disk``: the index file,
            what stays in RAM; its lists go to a file of their own).
        on_disk: only IVF indexes, their lists on disk.

    Returns:
        At least one plan.

    Raises:
        ValueError: no index fits; the message names the smallest one and what it needs.
    """
    if count < 1 or dim < 1:
        raise ValueError(f"an index needs a non-empty database; got {count} x {dim}")
    plans = plans_for(count, dim, on_disk=on_disk)
    fitting = [plan for plan in plans if plan.estimated_bytes <= budget]
    if not fitting:
        smallest = min(plans, key=lambda plan: plan.estimated_bytes)
        raise ValueError(f"--max-index-memory {human_bytes(budget)} is too small for {count} x {dim} vectors: "
                         f"the smallest index ({smallest.factory}) needs about "
                         f"{human_bytes(smallest.estimated_bytes)}{' in RAM, its lists on disk' if on_disk else ''}; "
                         "give at least that")
    return fitting


def faiss_module() -> Any:
    """faiss, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError("an index needs faiss: pip install 'ecomaug[faiss]' (faiss-cpu), or "
                          "faiss-gpu on a GPU machine; or use --index exact") from error
    return faiss


def _build_one(vectors: np.ndarray, plan: IndexPlan, seed: int, lists_file: Path | None = None,
               gpu: int | None = None) -> tuple[Any, int]:
    """``plan`` built on ``vectors`` (trained on a seeded sample, its k-means on ``gpu`` if one;
    its lists in ``lists_file`` for an on-disk plan); the size of its training sample."""
    faiss = faiss_module()
    count, dim = vectors.shape
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    sample = 0
    if plan.family == "HNSW":
        index.hnsw.efConstruction = 80
    else:
        if plan.pq_m:  # index_factory asks for polysemous training, which only a Hamming filter uses
            faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
        if plan.family == "OPQ+IVF-PQ":
            faiss.downcast_VectorTransform(index.chain.at(0)).niter = OPQ_ITERATIONS
        # k-means wants >= 39 points a centroid: the lists, and PQ's 256 a sub-quantizer
        sample = min(count, max(64 * plan.nlist, 256 * 40 if plan.pq_m else 0))
        rows = np.sort(np.random.default_rng(seed).choice(count, size=sample, replace=False))
        train_ivf(faiss, index, vectors[rows], gpu)
    if plan.on_disk:
        if lists_file is None:
            raise ValueError(f"an on-disk {plan.factory} needs a file for its lists (index_path)")
        return add_on_disk(index, vectors, lists_file, chunk=ADD_CHUNK, name=plan.factory), int(sample)
    _add_in_chunks(index, vectors, plan.factory)
    return index, int(sample)


def _add_in_chunks(index: Any, vectors: np.ndarray, name: str) -> None:
    """``vectors`` added to ``index`` ``ADD_CHUNK`` rows at a time (the same index as one add)."""
    from tqdm.auto import tqdm

    count = vectors.shape[0]
    with tqdm(total=count, desc=f"add to {name}", unit="vec", unit_scale=True, leave=False,
              disable=count <= ADD_CHUNK) as bar:
        for start in range(0, count, ADD_CHUNK):
            index.add(vectors[start:start + ADD_CHUNK])
            bar.update(min(ADD_CHUNK, count - start))


def serialized_bytes(index: Any) -> int:
    """The size of ``index`` serialised, counted as faiss writes it (no copy of the index in memory)."""
    faiss = faiss_module()
    total = 0

    def count(chunk: bytes) -> int:
        nonlocal total
        total += len(chunk)
        return len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total


def build_within_budget(vectors: np.ndarray, plans: Sequence[IndexPlan], budget: int, *, seed: int = 0,
                        lists_file: Path | None = None, gpu: int | None = None) -> tuple[Any, dict[str, Any]]:
    """The first of ``plans`` whose built index, serialised, fits ``budget`` bytes.

    Args:
        vectors: the database, unit rows, float32.
        plans: from :func:`plan_index`, most accurate first.
        budget: the most bytes the serialised index may take (an on-disk plan's: the index file).
        seed: seeds the training sample.
        lists_file: where an on-disk plan's inverted lists go.
        gpu: the GPU an IVF index's k-means runs on (:func:`ecomaug.matching.gpu.faiss_gpu`), or None.

    Returns:
        ``(index, info)``; info holds ``kind`` (the factory string), ``index_type``,
        ``index_bytes`` (serialised), ``estimated_bytes``, ``nlist``, ``pq_m``, ``train_sample``,
        ``rescored``, ``on_disk`` (with ``lists_file``, ``lists_bytes``, ``lists_digest``) and
        ``build_seconds``.

    Raises:
        ValueError: none fits once built. ImportError: no faiss.
    """
    tried = []
    for plan in plans:
        started = time.perf_counter()
        index, sample = _build_one(vectors, plan, seed, lists_file, gpu)
        size = serialized_bytes(index)
        if size <= budget:
            info: dict[str, Any] = {"kind": plan.factory, "index_type": plan.family, "index_bytes": size,
                                    "estimated_bytes": plan.estimated_bytes, "pq_m": plan.pq_m,
                                    "train_sample": sample, "rescored": plan.rescored, "on_disk": plan.on_disk,
                                    "build_seconds": time.perf_counter() - started}
            if plan.on_disk:
                info.update(lists_record(lists_file))
            if plan.nlist:
                info["nlist"] = plan.nlist
            return index, info
        tried.append(f"{plan.factory} {human_bytes(size)}")
    raise ValueError(f"--max-index-memory {human_bytes(budget)}: no index fits once built ({', '.join(tried)})")


def rescore(queries: np.ndarray, database: np.ndarray, candidates: np.ndarray, k: int, *,
            chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each query's candidates by their exact inner product, best first.

    Args:
        queries: unit query vectors.
        database: unit database vectors.
        candidates: database rows per query (-1: none), from an index.
        k: neighbours kept (at most the candidates' width).
        chunk: queries at a time (memory: ``chunk x C x D`` floats); default: 2^24 floats' worth.

    Returns:
        ``(scores, indices)``, each :math:`(Q, k)`; ``-inf`` / -1 where there is no candidate.

    Shape:
        - queries: :math:`(Q, D)`; database: :math:`(N, D)`; candidates: :math:`(Q, C)`, C >= k.
    """
    if candidates.shape[1] < k:
        raise ValueError(f"rescore keeps k={k} of {candidates.shape[1]} candidates a query")
    chunk = chunk or max(1, 2**24 // max(1, candidates.shape[1] * database.shape[1]))
    scores = np.empty((len(queries), k), dtype=np.float32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        rows = candidates[start:start + chunk]
        valid = rows >= 0
        vectors = database[np.where(valid, rows, 0)]  # q x C x D
        exact = np.einsum("qd,qcd->qc", queries[start:start + chunk], vectors)
        exact = np.where(valid, exact, -np.inf).astype(np.float32)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        scores[start:start + chunk] = np.take_along_axis(exact, order, axis=1)
        indices[start:start + chunk] = np.where(np.isfinite(scores[start:start + chunk]),
                                                np.take_along_axis(rows, order, axis=1), -1)
    return scores, indices
