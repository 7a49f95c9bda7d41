"""A threshold for "same item" from labelled pairs, chosen for a target precision, and kept.

Labelled pairs come as a CSV with columns ``a, b, same``: ``a`` and ``b`` name images of the two
catalogues by key or by source path as given in the input; ``same`` is 1/0 (or true/false,
yes/no). The chosen threshold is the lowest cosine at which the labelled pairs scoring at or
above it reach the target precision: the most recall for that precision. It is stored next to
the model (``match-threshold.json``) so later runs with that model reuse it.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

TRUE_WORDS = {"1", "true", "yes", "y", "same"}
FALSE_WORDS = {"0", "false", "no", "n", "different"}
THRESHOLD_FILE = "match-threshold.json"


@dataclass
class Calibration:
    """A calibrated threshold and how it was found.

    Attributes:
        threshold: cosine at or above which two listings are called the same item.
        precision_target: the precision asked for.
        precision: precision of the labelled pairs at the threshold.
        recall: their recall at the threshold.
        pairs: labelled pairs used; unresolved: rows naming an image found in neither catalogue.
        positives: pairs labelled same.
        rerank: the re-ranking depth the scores were computed with (a threshold fits one).
        labels: the labels file.
        model: the model's source.
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


def choose_threshold(scores: np.ndarray, same: np.ndarray, *, precision: float
                     ) -> tuple[float, float, float]:
    """The lowest threshold whose pairs reach ``precision``: ``(threshold, precision, recall)``.

    Raises:
        ValueError: no positive pair, or no threshold reaches the precision.
    """
    if not 0 < precision <= 1:
        raise ValueError(f"precision must be in (0, 1]; got {precision}")
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
    return curve["threshold"][i], curve["precision"][i], curve["recall"][i]


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
    """The threshold stored for this model and re-ranking depth, if any."""
    path = threshold_path(model_source)
    if path is None or not path.is_file():
        return None
    record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if record.get("rerank") != rerank:
        return None
    return Calibration(**{key: record[key] for key in Calibration.__dataclass_fields__})


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
    axis.set_xlabel("recall")
    axis.set_ylabel("precision")
    axis.set_title(f"labelled pairs: {calibration.pairs} ({calibration.positives} same)")
    axis.set_ylim(0, 1.02)
    axis.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
