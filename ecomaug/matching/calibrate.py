"""A threshold for "same item" from labelled pairs, chosen for a target precision, and kept.

Labelled pairs come as a CSV with columns ``a, b, same``: ``a`` and ``b`` name images of the two
catalogues by key or by source path as given in the input; ``same`` is 1/0 (or true/false,
yes/no). The chosen threshold is the lowest score at which the labelled pairs scoring at or
above it reach the target precision: the most recall for that precision. It applies to one
score (the raw cosine or the normalised score of :mod:`ecomaug.matching.normalise`) and says
which. A threshold that reaches the precision only by calling almost nothing the same item (recall
below :data:`MIN_RECALL`, or a threshold at the top of the score range) is refused, not kept.
A useful one is stored next to the model (``match-threshold.json``) so later runs with that
model reuse it; a stored one that is not useful (written before this check) is not reused.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TRUE_WORDS = {"1", "true", "yes", "y", "same"}
FALSE_WORDS = {"0", "false", "no", "n", "different"}
THRESHOLD_FILE = "match-threshold.json"
# A calibration that keeps less of the same-item pairs than this is no threshold for "same item".
MIN_RECALL = 0.5
# Both scores are at most 1 (identical images); a threshold this close to it calls nothing the same.
TOP_OF_RANGE = 1.0 - 1e-6


@dataclass
class Calibration:
    """A calibrated threshold and how it was found.

    Attributes:
        threshold: score at or above which two listings are called the same item.
        precision_target: the precision asked for.
        precision: precision of the labelled pairs at the threshold.
        recall: their recall at the threshold.
        pairs: labelled pairs used; unresolved: rows naming an image found in neither catalogue.
        positives: pairs labelled same.
        rerank: the re-ranking depth the scores were computed with (a threshold fits one).
        labels: the labels file.
        model: the model's source.
        score: which score ``threshold`` applies to, ``"cosine"`` or ``"normalised"`` (records
            written before scores were normalised are cosine).
        query_regions: the ``--query-regions`` the scores were computed with: a B listing's score
            is its best vector's, so a threshold fits one mode (older records: ``"none"``).
    """

    threshold: float
    precision_target: float
    precision: float
    recall: float
    pairs: int
    unresolved: int
    positives: int
    rerank: int
    labels: str
    model: str
    score: str = "cosine"
    query_regions: str = "none"


def calibration_problem(calibration: Calibration, *, min_recall: float = MIN_RECALL) -> str | None:
    """Why ``calibration`` is no useful threshold (too little recall, or the top of the score
    range), in words; None when it is useful."""
    if calibration.threshold >= TOP_OF_RANGE:
        return (f"threshold {calibration.threshold:.4f} is the top of the {calibration.score} range "
                f"(recall {calibration.recall:.3f})")
    if calibration.recall < min_recall:
        return f"recall {calibration.recall:.3f} < {min_recall} at threshold {calibration.threshold:.4f}"
    return None


def read_labels(path: str | os.PathLike, a_positions: dict[str, int], b_positions: dict[str, int]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Read labelled pairs and resolve their names to catalogue rows.

    Returns:
        ``(a_rows, b_rows, same, unresolved)``.

    Raises:
        FileNotFoundError: no such file. ValueError: missing columns, a bad ``same`` value, or
        no row naming images of both catalogues.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such labelled-pairs file", str(path))
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        missing = [c for c in ("a", "b", "same") if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: labelled pairs need columns a, b, same; missing "
                             f"{', '.join(missing)} (found {', '.join(reader.fieldnames or ()) or 'none'})")
        a_rows, b_rows, same, unresolved = [], [], [], 0
        for line, row in enumerate(reader, start=2):
            word = str(row["same"]).strip().lower()
            if word not in TRUE_WORDS | FALSE_WORDS:
                raise ValueError(f"{path}:{line}: same must be 1/0, true/false or yes/no; got "
                                 f"{row['same']!r}")
            a, b = a_positions.get(str(row["a"]).strip()), b_positions.get(str(row["b"]).strip())
            if a is None or b is None:
                unresolved += 1
                continue
            a_rows.append(a)
            b_rows.append(b)
            same.append(word in TRUE_WORDS)
    if not a_rows:
        raise ValueError(f"{path}: none of its {unresolved} rows names an image of --a (column a) "
                         "and one of --b (column b) by key or source path")
    return np.array(a_rows), np.array(b_rows), np.array(same, dtype=bool), unresolved


def precision_recall(scores: np.ndarray, same: np.ndarray) -> dict[str, list[float]]:
    """Precision and recall when calling every pair scoring >= each distinct score the same item."""
    order = np.argsort(-scores, kind="stable")
    ordered, labels = scores[order], same[order]
    true_positive = np.cumsum(labels)
    called = np.arange(1, len(labels) + 1)
    last = np.r_[ordered[1:] != ordered[:-1], True]  # ties are called together
    positives = max(int(same.sum()), 1)
    return {"threshold": ordered[last].tolist(),
            "precision": (true_positive[last] / called[last]).tolist(),
            "recall": (true_positive[last] / positives).tolist()}


def choose_threshold(scores: np.ndarray, same: np.ndarray, *, precision: float,
                     min_recall: float = MIN_RECALL) -> tuple[float, float, float]:
    """The lowest threshold whose pairs reach ``precision``: ``(threshold, precision, recall)``.

    Args:
        scores: each labelled pair's score.
        same: its label.
        precision: the precision to reach.
        min_recall: the least recall a useful threshold keeps (0 accepts any).

    Raises:
        ValueError: no positive pair, no threshold reaches the precision, or the one that does
            keeps less than ``min_recall`` of the positives or sits at the top of the range.
    """
    if not 0 < precision <= 1:
        raise ValueError(f"precision must be in (0, 1]; got {precision}")
    if not 0 <= min_recall <= 1:
        raise ValueError(f"min_recall must be in [0, 1]; got {min_recall}")
    if not same.any():
        raise ValueError("the labelled pairs hold no positive (same = 1) pair to calibrate on")
    curve = precision_recall(scores, same)
    reaching = [i for i, p in enumerate(curve["precision"]) if p >= precision]
    if not reaching:
        best = int(np.argmax(curve["precision"]))
        raise ValueError(f"no threshold reaches precision {precision} on these {len(scores)} "
                         f"labelled pairs (best {curve['precision'][best]:.3f} at "
                         f"{curve['threshold'][best]:.4f}); lower --precision or label more pairs")
    i = max(reaching, key=lambda j: (curve["recall"][j], -curve["threshold"][j]))
    threshold, reached, recall = curve["threshold"][i], curve["precision"][i], curve["recall"][i]
    if recall < min_recall or threshold >= TOP_OF_RANGE:
        where = " and is the top of the score range" if threshold >= TOP_OF_RANGE else ""
        raise ValueError(f"no useful threshold reaches precision {precision} on these {len(scores)} "
                         f"labelled pairs ({int(same.sum())} same): the best, {threshold:.4f}, keeps "
                         f"recall {recall:.3f} (at least {min_recall} needed){where}; nothing stored; "
                         "label more pairs (hard negatives too), lower --precision or use a better model")
    return threshold, reached, recall


def threshold_path(model_source: str | None) -> Path | None:
    """Where a model keeps its threshold: in its directory, or beside a checkpoint file."""
    if not model_source or model_source.startswith("random-init:"):
        return None
    path = Path(model_source)
    if path.is_dir():
        return path / THRESHOLD_FILE
    if path.is_file():
        return path.with_name(f"{path.name}.{THRESHOLD_FILE}")
    return None


def save_calibration(calibration: Calibration, *paths: Path | None) -> list[Path]:
    """Write the calibration to every given path (None skipped); returns those written."""
    from loaders.manifest import write_json_atomic

    written = []
    for path in paths:
        if path is not None:
            write_json_atomic(path, asdict(calibration))
            written.append(path)
    return written


def stored_threshold(model_source: str | None, *, rerank: int) -> Calibration | None:
    """The threshold stored for this model and re-ranking depth, if any (useful or not: see
    :func:`calibration_problem`)."""
    path = threshold_path(model_source)
    if path is None or not path.is_file():
        return None
    record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if record.get("rerank") != rerank:
        return None
    fields = Calibration.__dataclass_fields__
    return Calibration(**{key: record[key] for key in fields if key in record})


def plot_curve(curve: dict[str, list[float]], calibration: Calibration, path: Path) -> Path:
    """The precision-recall curve with the chosen point, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 4), dpi=100)
    axis.plot(curve["recall"], curve["precision"], marker=".", linewidth=1)
    axis.scatter([calibration.recall], [calibration.precision], color="red", zorder=3,
                 label=f"threshold {calibration.threshold:.4f}")
    axis.axhline(calibration.precision_target, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel(f"recall ({calibration.score} score)")
    axis.set_ylabel("precision")
    axis.set_title(f"labelled pairs: {calibration.pairs} ({calibration.positives} same)")
    axis.set_ylim(0, 1.02)
    axis.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


@dataclass
class Threshold:
    """The resolved threshold: its value, where it came from, the score it applies to."""

    value: float
    source: str
    score: str
    calibration: Calibration | None = None
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
