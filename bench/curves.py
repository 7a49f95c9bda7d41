"""One figure for training curves: loss, instance accuracy and held-out recall, a line per run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

Series = tuple[Sequence[float], Sequence[float]]  # steps, values


def plot_training_curves(runs: Mapping[str, Mapping[str, Series]], path: Path, *,
                         titles: Sequence[str] = ("InfoNCE loss", "instance accuracy", "held-out kNN recall@1"),
                         styles: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Three panels (``loss``, ``accuracy``, ``recall``), each run's series overlaid; recall as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, series in runs.items():
        style = dict((styles or {}).get(label, {}))
        for axis, name in zip(axes, ("loss", "accuracy", "recall")):
            steps, values = series.get(name, ((), ()))
            if len(steps):
                axis.plot(steps, values, label=label, **({"marker": "o"} if name == "recall" else {}), **style)
    for axis, title in zip(axes, titles):
        axis.set_title(title), axis.set_xlabel("step")
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
