"""Two catalogues to same-item pairs and gap items: search, threshold, pairs.csv, gaps.csv.

For every listing of A, its ``top_k`` nearest listings of B (cosine) scoring at or above the
threshold are pairs; a pair is *mutual* when each is the other's nearest neighbour. Listings of
B are clustered (B's own neighbours above the threshold, connected components), so several
listings of one item form one cluster; a cluster none of whose listings matches A is a *gap*,
and gaps are ranked by how many listings (and shops) the cluster holds: the opportunity list.

The threshold applies to one score, recorded with it: the raw cosine, or the cosine normalised
against each listing's background in A (:mod:`ecomaug.matching.normalise`), which an
uncalibrated run uses so that a model whose cosines are all high still leaves gaps. It is given
(``--threshold``), calibrated now (``--calibrate``), stored by an earlier calibration, or the
default; every output says which.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecomaug.evaluation.regions import QUERY_REGIONS
from ecomaug.limits import parse_size
from ecomaug.matching.calibrate import (Calibration, Threshold, calibration_problem, choose_threshold,
                                        plot_curve, precision_recall, read_labels,
                                        save_calibration, stored_threshold, threshold_path)
from ecomaug.matching.catalogue import Catalogue, check_compatible
from ecomaug.matching.normalise import BACKGROUND_RANKS, DEFAULT_MARGIN, SCORES, Scores, score_searches
from ecomaug.matching.outputs import write_gaps, write_pairs, write_parquet
from ecomaug.matching.regions import SearchRows, collapse, labelled_best, search_rows
from ecomaug.matching.rerank import expand
from ecomaug.matching.search import EXACT_LIMIT, SearchResult, check_index_options, fingerprint, search

# The cosine threshold used only with --score cosine when nothing better is known, always
# reported as uncalibrated (the normalised score's default is normalise.DEFAULT_MARGIN).
DEFAULT_THRESHOLD = 0.8


@dataclass(frozen=True)
class MatchOptions:
    """How to match (the ``ecomaug match`` options).

    Attributes:
        top_k: neighbours of each A listing considered as pairs.
        threshold: a fixed threshold on ``score`` (else calibrated, stored, or the uncalibrated
            default).
        calibrate: labelled pairs (CSV ``a, b, same``) to choose the threshold from.
        precision: the precision the calibrated threshold must reach.
        mutual_only: keep only mutual nearest neighbours.
        rerank: neighbours used by neighbourhood re-ranking (0 = off).
        index: ``auto``, ``exact``, ``ivf`` or ``hnsw`` (see :mod:`ecomaug.matching.search`).
        exact_limit: auto's largest database searched exactly.
        max_index_memory: a budget in bytes for each index (``--max-index-memory``): a database
            whose vectors exceed it gets the most accurate index that fits
            (:mod:`ecomaug.matching.index`); None: no budget.
        index_on_disk: with a budget, an IVF index keeps its lists in a file (``--index-on-disk``).
        shop_column: B's column counted per cluster (default ``shop`` when present).
        report_samples: pairs around the threshold and gaps shown in report.html (each).
        seed: seeds index training and the samples.
        score: which score the threshold applies to: ``"cosine"``, ``"normalised"``
            (:mod:`ecomaug.matching.normalise`) or ``"auto"``: the cosine for a given
            ``threshold`` (what it always meant), else a stored calibration's score, else the
            normalised score.
        query_regions: ``"none"``, or ``"items"`` / ``"grid"``: B's listings are searched by their
            item regions too (:mod:`ecomaug.matching.regions`; load B with ``regions=`` the same).
    """

    top_k: int = 10
    threshold: float | None = None
    calibrate: str | None = None
    precision: float = 0.95
    mutual_only: bool = False
    rerank: int = 0
    index: str = "auto"
    exact_limit: int = EXACT_LIMIT
    max_index_memory: int | None = None
    index_on_disk: bool = False
    shop_column: str | None = None
    report_samples: int = 24
    seed: int = 0
    score: str = "auto"
    query_regions: str = "none"

    def validate(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1; got {self.top_k}")
        if self.rerank < 0 or self.rerank > self.top_k:
            raise ValueError(f"--rerank must be in 0 .. --top-k ({self.top_k}); got {self.rerank}")
        if self.threshold is not None and self.calibrate is not None:
            raise ValueError("give --threshold or --calibrate, not both")
        if self.score not in ("auto", *SCORES):
            raise ValueError(f"--score must be one of auto, {', '.join(SCORES)}; got {self.score!r}")
        if self.threshold is not None and self.score == "normalised":
            if not (math.isfinite(self.threshold) and self.threshold <= 1):
                raise ValueError(f"--threshold on the normalised score is a number <= 1; got {self.threshold}")
        elif self.threshold is not None and not -1 <= self.threshold <= 1:
            raise ValueError(f"--threshold is a cosine in [-1, 1]; got {self.threshold}")
        if not 0 < self.precision <= 1:
            raise ValueError(f"--precision must be in (0, 1]; got {self.precision}")
        if self.max_index_memory is not None:
            parse_size(self.max_index_memory)  # its range, in its words
        check_index_options(self.index, self.max_index_memory, self.index_on_disk)
        if self.query_regions not in QUERY_REGIONS:
            raise ValueError(f"--query-regions must be one of {', '.join(QUERY_REGIONS)}; got {self.query_regions!r}")


@dataclass
class MatchResult:
    """What a match wrote and found (``summary.json`` holds the same)."""

    out_dir: Path
    threshold: float
    threshold_source: str  # "given", "calibrated" (now), "stored" (calibrated earlier) or "default"
    score: str  # what the threshold applies to: "cosine" or "normalised"
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
    notes: list[str] = field(default_factory=list)  # warnings for the user, e.g. a stored threshold not used
    regions: dict[str, Any] = field(default_factory=dict)  # with --query-regions: mode, counts

    @property
    def calibrated(self) -> bool:
        return self.threshold_source in ("calibrated", "stored")

    @property
    def threshold_description(self) -> str:
        """Where the threshold came from, in words (the command's line, report.html, summary.json)."""
        c = self.calibration
        if self.threshold_source == "calibrated" and c is not None:
            return (f"calibrated now on {c.labels} for precision {c.precision_target}: precision "
                    f"{c.precision:.3f}, recall {c.recall:.3f} on {c.pairs} labelled pairs")
        if self.threshold_source == "stored" and c is not None:
            return (f"calibrated earlier for precision {c.precision_target} on {c.labels} (recall "
                    f"{c.recall:.3f}), stored with the model")
        if self.threshold_source == "given":
            return "given with --threshold, not calibrated"
        return "UNCALIBRATED: pass --calibrate LABELLED.csv to choose it for a precision"

    @property
    def regions_description(self) -> str:
        """What ``--query-regions`` added, in words (empty without it)."""
        r = self.regions
        return (f"--query-regions {r['mode']}: {r['regions']} item regions of {r['listings_with_regions']} B "
                f"listings searched; {r['pairs_through_regions']} pairs found through a region") if r else ""


def _search_all(a: torch.Tensor, b: torch.Tensor, a_keys: list[str], b_keys: list[str],
                options: MatchOptions, out_dir: Path, device: torch.device | None, tag: str,
                rows: SearchRows | None = None) -> dict[str, SearchResult]:
    """The match's searches. With item regions (``rows``), ``b`` holds B's listings, then their
    regions: A's neighbours are listings, each by its best row, and the regions get their own
    neighbours in A (``regions_to_a``, for their background levels and the gaps)."""
    searched, b = b, b[:len(b_keys)]
    b_id, a_id = fingerprint(b_keys, b), fingerprint(a_keys, a)
    common = dict(method=options.index, exact_limit=options.exact_limit, seed=options.seed,
                  device=device, max_index_memory=options.max_index_memory, index_on_disk=options.index_on_disk)
    index_dir = out_dir / "index"
    if rows is None:
        a_to_b = search(a, b, k=options.top_k, index_path=index_dir / f"b{tag}.faiss",
                        database_id=b_id, **common)
    else:  # deep enough that top_k listings remain once each listing's lower rows are dropped
        a_to_b = collapse(search(a, searched, k=min(len(searched), options.top_k * rows.most),
                                 index_path=index_dir / f"b-regions{tag}.faiss",
                                 database_id=fingerprint(rows.keys(b_keys), searched), **common),
                          rows.owner, options.top_k)
    found = {
        "a_to_b": a_to_b,
        # deep enough for B's background levels in A too (normalise.BACKGROUND_RANKS)
        "b_to_a": search(b, a, k=max(options.top_k, BACKGROUND_RANKS[1]),
                         index_path=index_dir / f"a{tag}.faiss", database_id=a_id, **common),
        # k + 1: a listing finds itself first.
        "b_to_b": search(b, b, k=options.top_k + 1, index_path=index_dir / f"b{tag}.faiss",
                         database_id=b_id, **common),
        "a_to_a": search(a, a, k=BACKGROUND_RANKS[1] + 1, index_path=index_dir / f"a{tag}.faiss",
                         database_id=a_id, **common),
    }
    if len(searched) > len(b):
        found["regions_to_a"] = search(searched[len(b):], a, k=max(options.top_k, BACKGROUND_RANKS[1]),
                                       index_path=index_dir / f"a{tag}.faiss", database_id=a_id, **common)
    return found


def _rows_to_a(found: dict[str, SearchResult]) -> SearchResult:
    """Each B row's neighbours in A: its listings', then (with item regions) their regions'."""
    ba, regions = found["b_to_a"], found.get("regions_to_a")
    if regions is None:
        return ba
    return SearchResult(scores=np.concatenate([ba.scores, regions.scores]),
                        indices=np.concatenate([ba.indices, regions.indices]), method=ba.method)


def _search_reranked(a: Catalogue, b: Catalogue, options: MatchOptions, out: Path,
                     device: torch.device | None, rows: SearchRows | None
                     ) -> tuple[dict[str, SearchResult], torch.Tensor, torch.Tensor]:
    """The searches (again on re-ranked vectors with ``--rerank``), and the vectors searched: A's,
    and B's rows (its listings, then with ``--query-regions`` their item regions)."""
    b_searched = b.vectors if rows is None else torch.cat([b.vectors, b.regions.vectors])
    found = _search_all(a.vectors, b_searched, a.keys, b.keys, options, out, device, "", rows)
    if not options.rerank:
        return found, a.vectors, b_searched
    a_vectors = expand(a.vectors, b_searched, found["a_to_b"].indices, found["a_to_b"].scores,
                       n=options.rerank)
    rows_to_a = _rows_to_a(found)
    b_vectors = expand(b_searched, a.vectors, rows_to_a.indices, rows_to_a.scores, n=options.rerank)
    found = _search_all(a_vectors, b_vectors, a.keys, b.keys, options, out, device,
                        f"-rerank{options.rerank}", rows)
    return found, a_vectors, b_vectors


def _calibrate(scored: Scores, a_vectors: torch.Tensor, b_vectors: torch.Tensor, a: Catalogue,
               b: Catalogue, options: MatchOptions, model_source: str | None, out_dir: Path,
               rows: SearchRows | None = None) -> Threshold:
    """Choose the threshold on the labelled pairs (the run's score) and store it, if useful."""
    score = "normalised" if options.score == "auto" else options.score
    a_rows, b_rows, same, unresolved = read_labels(options.calibrate, a.positions(), b.positions())
    scores = labelled_best(scored, score, a_vectors, b_vectors, a_rows, b_rows, rows)
    # Raises, storing nothing, when no useful threshold reaches the precision.
    threshold, precision, recall = choose_threshold(scores, same, precision=options.precision)
    calibration = Calibration(threshold=float(threshold), precision_target=options.precision,
                              precision=float(precision), recall=float(recall),
                              pairs=int(len(same)), unresolved=unresolved,
                              positives=int(same.sum()), rerank=options.rerank,
                              labels=str(options.calibrate), model=model_source or "", score=score,
                              query_regions=options.query_regions)
    curve = precision_recall(scores, same)
    (out_dir / "precision_recall.json").write_text(
        json.dumps({"calibration": asdict(calibration), "curve": curve}, indent=1) + "\n",
        encoding="utf-8")
    plot_curve(curve, calibration, out_dir / "precision_recall.png")
    written = save_calibration(calibration, out_dir / "calibration.json",
                               threshold_path(model_source))
    return Threshold(calibration.threshold, "calibrated", score, calibration,
                      ["precision_recall.json", "precision_recall.png", *map(str, written)])


def _resolve_threshold(scored: Scores, a_vectors: torch.Tensor, b_vectors: torch.Tensor,
                       a: Catalogue, b: Catalogue, options: MatchOptions, model_source: str | None,
                       out_dir: Path, rows: SearchRows | None = None) -> Threshold:
    """Given, else calibrated now, else stored with the model (if useful and of the score asked
    for), else the default of the score."""
    if options.threshold is not None:
        return Threshold(options.threshold, "given", "cosine" if options.score == "auto" else options.score)
    if options.calibrate is not None:
        return _calibrate(scored, a_vectors, b_vectors, a, b, options, model_source, out_dir, rows)
    notes = []
    stored = stored_threshold(model_source, rerank=options.rerank)
    if stored is not None:
        problem = calibration_problem(stored)
        where = threshold_path(model_source)
        if options.score != "auto" and stored.score != options.score:
            notes.append(f"the threshold stored in {where} applies to the {stored.score} score, not "
                         f"--score {options.score}: not used")
        elif stored.query_regions != options.query_regions:
            notes.append(f"the threshold stored in {where} was calibrated with --query-regions "
                         f"{stored.query_regions}, this run uses {options.query_regions}: not used")
        elif problem is not None:
            notes.append(f"the threshold stored in {where} is not used ({problem}): calibrate again")
        else:
            return Threshold(stored.threshold, "stored", stored.score, stored)
    score = "normalised" if options.score == "auto" else options.score
    return Threshold(DEFAULT_MARGIN if score == "normalised" else DEFAULT_THRESHOLD, "default",
                      score, notes=notes)


def _region_rows(b: Catalogue, options: MatchOptions) -> SearchRows | None:
    """B's search rows with ``--query-regions``: its listings, then their regions (None without)."""
    if options.query_regions == "none":
        return None
    if b.regions is None or b.regions.mode != options.query_regions:
        raise ValueError(f"--query-regions {options.query_regions}: --b was loaded without its "
                         f"{options.query_regions} regions (load_catalogue(..., regions={options.query_regions!r}))")
    return search_rows(len(b), b.regions)


def _matched(b: Catalogue, found: dict[str, SearchResult], scored: Scores, threshold: Threshold,
             paired: np.ndarray) -> np.ndarray:
    """B's listings matched besides those whose own nearest A listing is close enough: the paired
    ones, and with item regions those with a region whose nearest A listing is."""
    if "regions_to_a" not in found:
        return paired
    nearest = found["regions_to_a"].indices[:, 0]
    close = scored.of(threshold.score)["regions_to_a"][:, 0] >= threshold.value
    return np.concatenate([paired, b.regions.rows[close & (nearest >= 0)]])


def _regions_summary(b: Catalogue, rows: SearchRows | None, pair_rows: np.ndarray) -> dict[str, Any]:
    """What the item regions added (summary.json's ``regions``): how many, of how many listings,
    and the pairs found through one (``pair_rows``: each pair's B row)."""
    if rows is None:
        return {}
    return {"mode": b.regions.mode, "regions": len(b.regions),
            "listings_with_regions": int(np.unique(b.regions.rows).size),
            "pairs_through_regions": int((pair_rows >= rows.listings).sum())}


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
            ``shop_column`` B does not have, ``query_regions`` B was not loaded with.
    """
    options.validate()
    check_compatible(a, b)
    rows = _region_rows(b, options)
    if options.shop_column is not None and options.shop_column not in b.columns():
        raise ValueError(f"--shop-column {options.shop_column!r} is not a column of --b (columns: "
                         f"{', '.join(b.columns()) or 'none'})")
    shop_column = options.shop_column or ("shop" if "shop" in b.columns() else None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    found, a_vectors, b_vectors = _search_reranked(a, b, options, out, device, rows)
    scored = score_searches(found)
    threshold = _resolve_threshold(scored, a_vectors, b_vectors, a, b, options, model_source, out, rows)
    if threshold.score == "normalised" and len(a) <= BACKGROUND_RANKS[1]:
        threshold.notes.append(f"--a holds {len(a)} listings: too few for the normalised score's "
                               f"background (the {BACKGROUND_RANKS[0]}th-{BACKGROUND_RANKS[1]}th nearest "
                               "listings of A); give --threshold with --score cosine, or calibrate")
    ab, ba, bb = found["a_to_b"], found["b_to_a"], found["b_to_b"]
    pairs = write_pairs(a, b, ab, _rows_to_a(found), scored, threshold, top_k=options.top_k,
                        mutual_only=options.mutual_only, out=out, rows=rows)
    files = ["pairs.csv", *threshold.files]
    parquet = write_parquet(out / "pairs.csv")
    if parquet is not None:
        files.append(parquet.name)
    gaps = write_gaps(a, b, ba, bb, scored, _matched(b, found, scored, threshold, pairs.b_rows), threshold,
                      shop_column=shop_column, out=out)
    files.append("gaps.csv")
    result = MatchResult(out_dir=out, threshold=float(threshold.value), threshold_source=threshold.source,
                         score=threshold.score, pairs=pairs.count,
                         mutual_pairs=int(pairs.mutual[pairs.is_pair].sum()), a_listings=len(a),
                         b_listings=len(b), b_matched=gaps.b_matched,
                         gap_listings=gaps.count, gap_clusters=gaps.clusters,
                         calibration=threshold.calibration,
                         searches={name: {"method": r.method, **{k: v for k, v in r.info.items()
                                                                 if k != "database_id"}}
                                   for name, r in found.items()}, files=files, notes=threshold.notes,
                         regions=_regions_summary(b, rows, ab.indices[pairs.a_rows, pairs.slots]))
    if report:
        from ecomaug.matching.report import write_report

        best = {score: {"A's best in B": scored.of(score)["a_to_b"][:, 0],
                        "B's best in A": scored.of(score)["b_to_a"][:, 0]} for score in SCORES}
        files += write_report(result, a, b, ba=ba, best=best, order=gaps.order,
                              component=gaps.component, sizes=gaps.sizes,
                              samples=options.report_samples)
    summary = {**{k: v for k, v in asdict(result).items() if k not in ("out_dir", "calibration")},
               "calibrated": result.calibrated,
               "threshold_description": result.threshold_description,
               "calibration": asdict(threshold.calibration) if threshold.calibration else None,
               "normalisation": {"background": "a", "ranks": list(BACKGROUND_RANKS),
                                 "score": "(cosine - level) / (1 - level), level = mean of the two "
                                          "listings' mean cosine to their neighbours of these ranks in A"},
               "options": asdict(options), "a": a.source, "b": b.source,
               "note": None if result.calibrated else
               "the threshold is uncalibrated: pass --calibrate LABELLED.csv (columns a, b, same) "
               "to choose it for a precision"}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n",
                                      encoding="utf-8")
    return result
