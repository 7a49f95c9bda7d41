"""What ``ecomaug match`` writes: pairs.csv (A's neighbours in B at or above the threshold, with
prices) and gaps.csv (clusters of B none of whose listings matches A), each through the one
atomic writer, and pairs.parquet where pyarrow is installed."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from ecomaug.matching.calibrate import Threshold
from ecomaug.matching.catalogue import Catalogue
from ecomaug.matching.normalise import Scores
from ecomaug.matching.regions import SearchRows
from ecomaug.matching.search import SearchResult
from loaders.atomic import write_atomic


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


def write_csv(path: Path, header: list[str], rows: Iterable[list[Any]]) -> int:
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


def write_parquet(csv_path: Path) -> Path | None:
    try:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
    except ImportError:
        return None
    path = csv_path.with_suffix(".parquet")
    pq.write_table(pacsv.read_csv(csv_path), path)
    return path


@dataclass
class Pairs:
    """The pairs written to pairs.csv: A's row, its neighbour slot and B's row of each, and the flags."""

    a_rows: np.ndarray
    slots: np.ndarray
    b_rows: np.ndarray
    is_pair: np.ndarray
    mutual: np.ndarray
    count: int


def write_pairs(a: Catalogue, b: Catalogue, ab: SearchResult, ba: SearchResult, scored: Scores,
                threshold: Threshold, *, top_k: int, mutual_only: bool, out: Path,
                rows: SearchRows | None = None) -> Pairs:
    """Pairs: A's neighbours in B at or above the threshold (on its score), to ``out/pairs.csv``.

    With item regions (``rows``), ``ab`` and ``ba`` index B's search rows (its listings, then their
    regions): a pair names its listing and, in ``b_region``, the row it was found through.
    """
    b_best = ba.indices[:, 0]  # each B row's nearest A listing
    rank = np.broadcast_to(np.arange(1, top_k + 1), ab.indices.shape)
    normalised = scored.normalised["a_to_b"]
    is_pair = (ab.indices >= 0) & (scored.of(threshold.score)["a_to_b"] >= threshold.value)
    mutual = is_pair & (rank == 1) & (b_best[np.maximum(ab.indices, 0)] ==
                                      np.arange(len(a))[:, None])
    if mutual_only:
        is_pair &= mutual
    pair_a, pair_slot = np.nonzero(is_pair)
    pair_row = ab.indices[pair_a, pair_slot]
    pair_b = pair_row if rows is None else rows.owner[pair_row]
    a_columns, b_columns = a.columns(), b.columns()
    priced = "price" in a_columns and "price" in b_columns
    header = ["a_key", "b_key", *(["b_region"] if rows is not None else []), "score", "normalised_score",
              "rank", "mutual", *[f"a_{c}" for c in a_columns],
              *[f"b_{c}" for c in b_columns], *(["price_a", "price_b", "price_ratio"] if priced
                                                else [])]

    def pair_rows() -> Iterator[list[Any]]:
        for i, slot, j, r in zip(pair_a.tolist(), pair_slot.tolist(), pair_b.tolist(), pair_row.tolist()):
            region = [rows.labels[r]] if rows is not None else []
            row = [a.keys[i], b.keys[j], *region, f"{ab.scores[i, slot]:.6f}", f"{normalised[i, slot]:.6f}",
                   slot + 1, int(mutual[i, slot]), *[a.meta[i].get(c, "") for c in a_columns],
                   *[b.meta[j].get(c, "") for c in b_columns]]
            if priced:
                price_a, price_b = _number(a.meta[i].get("price")), _number(b.meta[j].get("price"))
                ratio = price_b / price_a if price_a and price_b is not None else None
                row += [price_a if price_a is not None else "",
                        price_b if price_b is not None else "",
                        f"{ratio:.6f}" if ratio is not None else ""]
            yield row

    count = write_csv(out / "pairs.csv", header, pair_rows())
    return Pairs(a_rows=pair_a, slots=pair_slot, b_rows=pair_b, is_pair=is_pair, mutual=mutual, count=count)


@dataclass
class Gaps:
    """The gaps written to gaps.csv: B's gap rows in report order, B's clusters and their sizes."""

    order: list[int]
    component: np.ndarray
    sizes: np.ndarray
    clusters: int
    b_matched: int
    count: int


def write_gaps(a: Catalogue, b: Catalogue, ba: SearchResult, bb: SearchResult, scored: Scores,
                pair_b: np.ndarray, threshold: Threshold, *, shop_column: str | None, out: Path) -> Gaps:
    """Gaps: clusters of B none of whose listings matches A, written to ``out/gaps.csv``."""
    b_best = ba.indices[:, 0]
    b_columns = b.columns()
    decide = scored.of(threshold.score)
    nearest_normalised = scored.normalised["b_to_a"][:, 0]
    b_matched = (decide["b_to_a"][:, 0] >= threshold.value) & (b_best >= 0)
    b_matched[pair_b] = True
    component = clusters(bb.indices, decide["b_to_b"], threshold.value)
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
                  "b_key", "nearest_a_key", "nearest_score", "nearest_normalised_score", *b_columns]

    def gap_lines() -> Iterator[list[Any]]:
        for j in order:
            c = int(component[j])
            nearest = int(b_best[j])
            yield [gap_rank[c], int(sizes[c]), *([len(shops[c])] if shop_column else []),
                   b.keys[j], a.keys[nearest] if nearest >= 0 else "",
                   f"{ba.scores[j, 0]:.6f}" if nearest >= 0 else "",
                   f"{nearest_normalised[j]:.6f}" if nearest >= 0 else "",
                   *[b.meta[j].get(column, "") for column in b_columns]]

    count = write_csv(out / "gaps.csv", gap_header, gap_lines())
    return Gaps(order=order, component=component, sizes=sizes, clusters=len(gap_rank),
                 b_matched=int(matched_component[component].sum()), count=count)
