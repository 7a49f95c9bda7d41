"""Two catalogues to same-item pairs and gap items: search, threshold, pairs.csv, gaps.csv.

For every listing of A, its ``top_k`` nearest listings of B (cosine) scoring at or above the
threshold are pairs; a pair is *mutual* when each is the other's nearest neighbour. Listings of
B are clustered (B's own neighbours above the threshold, connected components), so several
listings of one item form one cluster; a cluster none of whose listings matches A is a *gap*,
and gaps are ranked by how many listings (and shops) the cluster holds: the opportunity list.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np
import torch

from ecomaug.matching.calibrate import (Calibration, choose_threshold, plot_curve,
                                        precision_recall, read_labels, save_calibration,
                                        stored_threshold, threshold_path)
from ecomaug.matching.catalogue import Catalogue, check_compatible
from ecomaug.matching.rerank import expand
from ecomaug.matching.search import EXACT_LIMIT, SearchResult, fingerprint, search
from loaders.atomic import write_atomic

# Used only when nothing better is known, and always reported as uncalibrated.
DEFAULT_THRESHOLD = 0.8


@dataclass(frozen=True)
class MatchOptions:
    """How to match (the ``ecomaug match`` options).

    Attributes:
        top_k: neighbours of each A listing considered as pairs.
        threshold: a fixed cosine threshold (else calibrated, stored, or the uncalibrated default).
        calibrate: labelled pairs (CSV ``a, b, same``) to choose the threshold from.
        precision: the precision the calibrated threshold must reach.
        mutual_only: keep only mutual nearest neighbours.
        rerank: neighbours used by neighbourhood re-ranking (0 = off).
        index: ``auto``, ``exact``, ``ivf`` or ``hnsw`` (see :mod:`ecomaug.matching.search`).
        exact_limit: auto's largest database searched exactly.
        shop_column: B's column counted per cluster (default ``shop`` when present).
        report_samples: pairs around the threshold and gaps shown in report.html (each).
        seed: seeds index training and the samples.
    """

    top_k: int = 10
    threshold: float | None = None
    calibrate: str | None = None
    precision: float = 0.95
    mutual_only: bool = False
    rerank: int = 0
    index: str = "auto"
    exact_limit: int = EXACT_LIMIT
    shop_column: str | None = None
    report_samples: int = 24
    seed: int = 0

    def validate(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1; got {self.top_k}")
        if self.rerank < 0 or self.rerank > self.top_k:
            raise ValueError(f"--rerank must be in 0 .. --top-k ({self.top_k}); got {self.rerank}")
        if self.threshold is not None and self.calibrate is not None:
            raise ValueError("give --threshold or --calibrate, not both")
        if self.threshold is not None and not -1 <= self.threshold <= 1:
            raise ValueError(f"--threshold is a cosine in [-1, 1]; got {self.threshold}")
        if not 0 < self.precision <= 1:
            raise ValueError(f"--precision must be in (0, 1]; got {self.precision}")


@dataclass
class MatchResult:
    """What a match wrote and found (``summary.json`` holds the same)."""

    out_dir: Path
    threshold: float
    threshold_source: str  # "given", "calibrated", "stored" or "uncalibrated default"
    pairs: int
    mutual_pairs: int
    a_listings: int
    b_listings: int
    b_matched: int
    gap_listings: int
    gap_clusters: int
    calibration: Calibration | None = None
    searches: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    @property
    def calibrated(self) -> bool:
        return self.threshold_source in ("calibrated", "stored")


def _search_all(a: torch.Tensor, b: torch.Tensor, a_keys: list[str], b_keys: list[str],
                options: MatchOptions, out_dir: Path, device: torch.device | None, tag: str
                ) -> dict[str, SearchResult]:
    b_id, a_id = fingerprint(b_keys, b), fingerprint(a_keys, a)
    common = dict(method=options.index, exact_limit=options.exact_limit, seed=options.seed,
                  device=device)
    index_dir = out_dir / "index"
    return {
        "a_to_b": search(a, b, k=options.top_k, index_path=index_dir / f"b{tag}.faiss",
                         database_id=b_id, **common),
        "b_to_a": search(b, a, k=options.top_k, index_path=index_dir / f"a{tag}.faiss",
                         database_id=a_id, **common),
        # k + 1: a listing finds itself first.
        "b_to_b": search(b, b, k=options.top_k + 1, index_path=index_dir / f"b{tag}.faiss",
                         database_id=b_id, **common),
    }


def clusters(indices: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Connected components of the graph "row i has j among its neighbours at >= threshold".

    Returns:
        Each row's component, labelled by its smallest row.

    Shape:
        - indices, scores: :math:`(N, k)`; output :math:`(N,)`.
    """
    count = indices.shape[0]
    keep = (indices >= 0) & (scores >= threshold)
    source = np.repeat(np.arange(count), indices.shape[1])[keep.ravel()]
    target = indices.ravel()[keep.ravel()]
    labels = np.arange(count)
    while True:  # min-label propagation with pointer jumping; converges in O(log diameter) rounds
        smallest = np.minimum(labels[source], labels[target])
        updated = labels.copy()
        np.minimum.at(updated, source, smallest)
        np.minimum.at(updated, target, smallest)
        updated = updated[updated]
        if np.array_equal(updated, labels):
            return labels
        labels = updated


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _write_csv(path: Path, header: list[str], rows: Iterable[list[Any]]) -> int:
    """Write a CSV through the one atomic writer (readers never see half of it); returns the rows."""
    count = 0

    def write(stream: BinaryIO) -> None:
        nonlocal count
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(header)
        for row in rows:
            writer.writerow(row)
            count += 1
            if text.tell() > 1 << 20:  # hand the disk a megabyte at a time
                stream.write(text.getvalue().encode("utf-8"))
                text.seek(0), text.truncate()
        stream.write(text.getvalue().encode("utf-8"))

    write_atomic(path, write)
    return count


def _write_parquet(csv_path: Path) -> Path | None:
    try:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
    except ImportError:
        return None
    path = csv_path.with_suffix(".parquet")
    pq.write_table(pacsv.read_csv(csv_path), path)
    return path


def _resolve_threshold(a_vectors: torch.Tensor, b_vectors: torch.Tensor, a: Catalogue,
                       b: Catalogue, options: MatchOptions, model_source: str | None,
                       out_dir: Path) -> tuple[float, str, Calibration | None, list[str]]:
    if options.threshold is not None:
        return options.threshold, "given", None, []
    if options.calibrate is not None:
        a_rows, b_rows, same, unresolved = read_labels(options.calibrate, a.positions(),
                                                       b.positions())
        scores = (a_vectors[a_rows] * b_vectors[b_rows]).sum(dim=1).numpy()
        threshold, precision, recall = choose_threshold(scores, same, precision=options.precision)
        calibration = Calibration(threshold=float(threshold), precision_target=options.precision,
                                  precision=float(precision), recall=float(recall),
                                  pairs=int(len(same)), unresolved=unresolved,
                                  positives=int(same.sum()), rerank=options.rerank,
                                  labels=str(options.calibrate), model=model_source or "")
        curve = precision_recall(scores, same)
        (out_dir / "precision_recall.json").write_text(
            json.dumps({"calibration": asdict(calibration), "curve": curve}, indent=1) + "\n",
            encoding="utf-8")
        plot_curve(curve, calibration, out_dir / "precision_recall.png")
        written = save_calibration(calibration, out_dir / "calibration.json",
                                   threshold_path(model_source))
        return calibration.threshold, "calibrated", calibration, [
            "precision_recall.json", "precision_recall.png", *map(str, written)]
    stored = stored_threshold(model_source, rerank=options.rerank)
    if stored is not None:
        return stored.threshold, "stored", stored, []
    return DEFAULT_THRESHOLD, "uncalibrated default", None, []


@dataclass
class _Pairs:
    """The pairs written to pairs.csv: A's row, its neighbour slot and B's row of each, and the flags."""

    a_rows: np.ndarray
    slots: np.ndarray
    b_rows: np.ndarray
    is_pair: np.ndarray
    mutual: np.ndarray
    count: int


def _write_pairs(a: Catalogue, b: Catalogue, ab: SearchResult, ba: SearchResult, threshold: float,
                 options: MatchOptions, out: Path) -> _Pairs:
    """Pairs: A's neighbours in B above the threshold, written to ``out/pairs.csv``."""
    b_best = ba.indices[:, 0]  # each B listing's nearest A listing
    rank = np.broadcast_to(np.arange(1, options.top_k + 1), ab.indices.shape)
    is_pair = (ab.indices >= 0) & (ab.scores >= threshold)
    mutual = is_pair & (rank == 1) & (b_best[np.maximum(ab.indices, 0)] ==
                                      np.arange(len(a))[:, None])
    if options.mutual_only:
        is_pair &= mutual
    pair_a, pair_slot = np.nonzero(is_pair)
    pair_b = ab.indices[pair_a, pair_slot]
    a_columns, b_columns = a.columns(), b.columns()
    priced = "price" in a_columns and "price" in b_columns
    header = ["a_key", "b_key", "score", "rank", "mutual", *[f"a_{c}" for c in a_columns],
              *[f"b_{c}" for c in b_columns], *(["price_a", "price_b", "price_ratio"] if priced
                                                else [])]

    def pair_rows() -> Iterator[list[Any]]:
        for i, slot, j in zip(pair_a.tolist(), pair_slot.tolist(), pair_b.tolist()):
            row = [a.keys[i], b.keys[j], f"{ab.scores[i, slot]:.6f}", slot + 1,
                   int(mutual[i, slot]), *[a.meta[i].get(c, "") for c in a_columns],
                   *[b.meta[j].get(c, "") for c in b_columns]]
            if priced:
                price_a, price_b = _number(a.meta[i].get("price")), _number(b.meta[j].get("price"))
                ratio = price_b / price_a if price_a and price_b is not None else None
                row += [price_a if price_a is not None else "",
                        price_b if price_b is not None else "",
                        f"{ratio:.6f}" if ratio is not None else ""]
            yield row

    count = _write_csv(out / "pairs.csv", header, pair_rows())
    return _Pairs(a_rows=pair_a, slots=pair_slot, b_rows=pair_b, is_pair=is_pair, mutual=mutual, count=count)


@dataclass
class _Gaps:
    """The gaps written to gaps.csv: B's gap rows in report order, B's clusters and their sizes."""

    order: list[int]
    component: np.ndarray
    sizes: np.ndarray
    clusters: int
    b_matched: int
    count: int


def _write_gaps(a: Catalogue, b: Catalogue, ba: SearchResult, bb: SearchResult, pair_b: np.ndarray,
                threshold: float, shop_column: str | None, out: Path) -> _Gaps:
    """Gaps: clusters of B none of whose listings matches A, written to ``out/gaps.csv``."""
    b_best = ba.indices[:, 0]
    b_columns = b.columns()
    b_matched = (ba.scores[:, 0] >= threshold) & (b_best >= 0)
    b_matched[pair_b] = True
    component = clusters(bb.indices, bb.scores, threshold)
    matched_component = np.zeros(len(b), dtype=bool)
    matched_component[component[b_matched]] = True
    gap = ~matched_component[component]
    sizes = np.bincount(component, minlength=len(b))
    shops: dict[int, set[Any]] = {}
    if shop_column is not None:
        for j in np.nonzero(gap)[0].tolist():
            shops.setdefault(int(component[j]), set()).add(b.meta[j].get(shop_column))
    gap_rows = np.nonzero(gap)[0]
    order = sorted(gap_rows.tolist(), key=lambda j: (
        -sizes[component[j]], -len(shops.get(int(component[j]), ())), int(component[j]),
        -float(ba.scores[j, 0])))
    gap_rank: dict[int, int] = {}
    for j in order:
        gap_rank.setdefault(int(component[j]), len(gap_rank) + 1)
    gap_header = ["gap_rank", "cluster_listings", *(["cluster_shops"] if shop_column else []),
                  "b_key", "nearest_a_key", "nearest_score", *b_columns]

    def gap_lines() -> Iterator[list[Any]]:
        for j in order:
            c = int(component[j])
            nearest = int(b_best[j])
            yield [gap_rank[c], int(sizes[c]), *([len(shops[c])] if shop_column else []),
                   b.keys[j], a.keys[nearest] if nearest >= 0 else "",
                   f"{ba.scores[j, 0]:.6f}" if nearest >= 0 else "",
                   *[b.meta[j].get(column, "") for column in b_columns]]

    count = _write_csv(out / "gaps.csv", gap_header, gap_lines())
    return _Gaps(order=order, component=component, sizes=sizes, clusters=len(gap_rank),
                 b_matched=int(matched_component[component].sum()), count=count)


def match_catalogues(a: Catalogue, b: Catalogue, out_dir: str | os.PathLike, *,
                     options: MatchOptions = MatchOptions(), model_source: str | None = None,
                     device: torch.device | None = None, report: bool = True) -> MatchResult:
    """Match catalogue B against A and write pairs.csv, gaps.csv, summary.json (and the report).

    Args:
        a: ours. b: theirs (see :func:`ecomaug.matching.catalogue.load_catalogue`).
        out_dir: the output directory (created).
        options: see :class:`MatchOptions`.
        model_source: the model's path, where a calibrated threshold is stored and looked up.
        device: where exact search runs.
        report: also write report.html and the score histogram.

    Raises:
        ValueError: incompatible catalogues, bad options, labels that cannot calibrate, a
            ``shop_column`` B does not have.
    """
    options.validate()
    check_compatible(a, b)
    if options.shop_column is not None and options.shop_column not in b.columns():
        raise ValueError(f"--shop-column {options.shop_column!r} is not a column of --b (columns: "
                         f"{', '.join(b.columns()) or 'none'})")
    shop_column = options.shop_column or ("shop" if "shop" in b.columns() else None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    a_vectors, b_vectors = a.vectors, b.vectors
    found = _search_all(a_vectors, b_vectors, a.keys, b.keys, options, out, device, "")
    if options.rerank:
        a_vectors = expand(a.vectors, b.vectors, found["a_to_b"].indices, found["a_to_b"].scores,
                           n=options.rerank)
        b_vectors = expand(b.vectors, a.vectors, found["b_to_a"].indices, found["b_to_a"].scores,
                           n=options.rerank)
        found = _search_all(a_vectors, b_vectors, a.keys, b.keys, options, out, device,
                            f"-rerank{options.rerank}")
    threshold, source, calibration, files = _resolve_threshold(a_vectors, b_vectors, a, b,
                                                               options, model_source, out)
    ab, ba, bb = found["a_to_b"], found["b_to_a"], found["b_to_b"]
    pairs = _write_pairs(a, b, ab, ba, threshold, options, out)
    files = ["pairs.csv", *files]
    parquet = _write_parquet(out / "pairs.csv")
    if parquet is not None:
        files.append(parquet.name)
    gaps = _write_gaps(a, b, ba, bb, pairs.b_rows, threshold, shop_column, out)
    files.append("gaps.csv")
    result = MatchResult(out_dir=out, threshold=float(threshold), threshold_source=source,
                         pairs=pairs.count, mutual_pairs=int(pairs.mutual[pairs.is_pair].sum()), a_listings=len(a),
                         b_listings=len(b), b_matched=gaps.b_matched,
                         gap_listings=gaps.count, gap_clusters=gaps.clusters,
                         calibration=calibration,
                         searches={name: {"method": r.method, **{k: v for k, v in r.info.items()
                                                                 if k != "database_id"}}
                                   for name, r in found.items()}, files=files)
    if report:
        from ecomaug.matching.report import write_report

        files += write_report(result, a, b, ab=ab, ba=ba, pair_a=pairs.a_rows, pair_slot=pairs.slots,
                              order=gaps.order, component=gaps.component, sizes=gaps.sizes,
                              samples=options.report_samples, seed=options.seed)
    summary = {**{k: v for k, v in asdict(result).items() if k not in ("out_dir", "calibration")},
               "calibrated": result.calibrated,
               "calibration": asdict(calibration) if calibration else None,
               "options": asdict(options), "a": a.source, "b": b.source,
               "note": None if result.calibrated else
               "the threshold is uncalibrated: pass --calibrate LABELLED.csv (columns a, b, same) "
               "to choose it for a precision"}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n",
                                      encoding="utf-8")
    return result
