"""How far a recall measured on few queries can be read: its standard error, and one warning line
when a held-out set is too small to tell the trained model from its baselines.

A recall@1 of ``p`` over ``n`` queries is a mean of ``n`` hits; its standard error is
``sqrt(p (1 - p) / n)`` (the binomial's). Two recalls closer than :data:`SEPARATION` standard
errors of their difference (``sqrt(se_a^2 + se_b^2)``, the queries taken as independent) are not
told apart by the set. Below :data:`MIN_QUERIES` queries or :data:`MIN_ITEMS` items a set is too
small whatever the recalls: at ``p = 0.5`` and 100 queries the standard error is 0.05 (a 0.1
difference is two of them), and among 20 items a random guess is right one time in 20.
Both the training run's closing line and ``ecomaug eval`` use these rules.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

MIN_QUERIES = 100
MIN_ITEMS = 20
SEPARATION = 2.0
# The report's models that are baselines (ecomaug.evaluation.report's ModelSpec kinds); the first
# model of another kind is the one they are compared with.
BASELINE_KINDS = ("random-init", "pretrained", "pixels")


def standard_error(recall: float, num_queries: int) -> float:
    """``sqrt(recall (1 - recall) / num_queries)``: the standard error of a recall over ``num_queries``.

    Raises:
        ValueError: ``num_queries < 1`` or ``recall`` outside [0, 1].
    """
    if num_queries < 1:
        raise ValueError(f"a recall needs at least one query, got num_queries={num_queries}")
    if not 0.0 <= recall <= 1.0:
        raise ValueError(f"a recall lies in [0, 1], got {recall}")
    return math.sqrt(recall * (1.0 - recall) / num_queries)


def summary_error(summary: dict[str, Any]) -> float | None:
    """The standard error of a retrieval summary's ``recall@1`` (None without queries or a recall)."""
    recall, count = summary.get("recall@1"), summary.get("num_queries") or 0
    if count < 1 or not isinstance(recall, float) or not math.isfinite(recall):
        return None
    return standard_error(recall, count)


def inseparable(first: float, second: float, num_queries: int) -> bool:
    """Whether two recalls over the same ``num_queries`` lie within :data:`SEPARATION` standard errors."""
    spread = math.hypot(standard_error(first, num_queries), standard_error(second, num_queries))
    return abs(first - second) <= SEPARATION * spread


def _warning(reasons: list[str], counts: str, detail: str) -> str | None:
    if not reasons:
        return None
    return (f"warning: too few held-out queries to separate the models ({counts}; {detail}): "
            f"{'; '.join(reasons)}; hold out more items (>= {MIN_ITEMS} items, >= {MIN_QUERIES} queries)")


def _too_small(num_queries: int, num_items: int | None) -> list[str]:
    small = num_queries < MIN_QUERIES or (num_items is not None and num_items < MIN_ITEMS)
    return [f"under {MIN_ITEMS} items or {MIN_QUERIES} queries"] if small else []


def held_out_warning(trained: float, baselines: dict[str, float | None], *, num_queries: int,
                     num_items: int | None = None) -> str | None:
    """The training run's closing warning, or None when its held-out set separates the models.

    Args:
        trained: the trained backbone's recall@1.
        baselines: label -> recall@1 of each baseline (random init, the frozen start); None skipped.
        num_queries: the queries every recall was measured on.
        num_items: the distinct items among them.
    """
    reasons = _too_small(num_queries, num_items)
    close = [f"{label} {value:.3f}" for label, value in baselines.items()
             if value is not None and inseparable(trained, value, num_queries)]
    if close:
        reasons.append(f"trained {trained:.3f} is within {SEPARATION:g} standard errors of {', '.join(close)}")
    items = f" of {num_items} items" if num_items is not None else ""
    return _warning(reasons, f"{num_queries} queries{items}",
                    f"trained recall@1 {trained:.3f} ± {standard_error(trained, num_queries):.3f} standard error")


def report_warning(results: Sequence[Any], *, num_items: int | None = None) -> str | None:
    """``ecomaug eval``'s warning for its results (:class:`~ecomaug.evaluation.report.ModelResult`),
    or None: the first model that is not a baseline against each baseline, on each disturbance."""
    recalls = {result.label: {name: summary for name, summary in result.summaries.items()
                              if math.isfinite(summary.get("recall@1", math.nan)) and summary.get("num_queries")}
               for result in results}
    counts = [summary["num_queries"] for by_name in recalls.values() for summary in by_name.values()]
    if not counts:
        return None
    reasons = _too_small(min(counts), num_items)
    trained = next((result for result in results if result.info.get("kind") not in BASELINE_KINDS), None)
    baselines = [result for result in results if result.info.get("kind") in BASELINE_KINDS] if trained else []
    for baseline in baselines:
        close = [name for name, summary in recalls[trained.label].items() if name in recalls[baseline.label]
                 and inseparable(summary["recall@1"], recalls[baseline.label][name]["recall@1"],
                                 summary["num_queries"])]
        if close:
            reasons.append(f"{trained.label} is within {SEPARATION:g} standard errors of {baseline.label} "
                           f"on {', '.join(close)}")
    largest = max(standard_error(summary["recall@1"], summary["num_queries"])
                  for by_name in recalls.values() for summary in by_name.values())
    items = f" of {num_items} items" if num_items is not None else ""
    return _warning(reasons, f"{min(counts)} queries per disturbance{items}",
                    f"recall@1's standard error up to ±{largest:.3f}")


def report_lines(results: Sequence[Any], *, num_items: int | None = None) -> list[str]:
    """The lines under ``ecomaug eval``'s table: the largest standard error of recall@1, and the
    :func:`report_warning` when there is one."""
    errors = [error for result in results for summary in result.summaries.values()
              if (error := summary_error(summary)) is not None]
    if not errors:
        return []
    warning = report_warning(results, num_items=num_items)
    return [f"recall@1's standard error, sqrt(p(1-p)/queries): up to ±{max(errors):.3f}",
            *([warning] if warning else [])]
