"""What a benchmark run says: the table, the verdict line, JSON for scripts and a PNG bar chart."""

from __future__ import annotations

import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.stages import BenchRun, StageResult

FORMAT_NAME = "ecomaug-bench"
FORMAT_VERSION = 1
# A training run fed by the loader within this fraction of the ceiling is limited by the model.
MODEL_BOUND_FRACTION = 0.9
# A row whose slowest and fastest repetitions differ by more than this fraction of the median.
NOISY_SPREAD = 0.5
DATA_STAGES = ("read", "decode", "crops", "recipe")
VERDICT_NAMES = {"read": "tar read", "decode": "decode", "crops": "crops", "recipe": "recipe"}


def rate_text(rate: float) -> str:
    """Images/s the way a reader scans them: thousands separated, decimals only below 100."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}"


def _rate(result: StageResult) -> float:
    return result.measurement.median_rate


def baseline_ratios(run: BenchRun) -> dict[str, float]:
    """Each of our loaders' crops throughput divided by the baseline's, by backend."""
    baseline = run.find("crops", "cumulative", "baseline")
    if not baseline:
        return {}
    reference = _rate(baseline[0])
    return {r.backend: _rate(r) / reference for r in run.find("crops", "cumulative") if r.backend != "baseline"}


def verdict(run: BenchRun) -> dict[str, Any]:
    """Which stage limits training: the model (its ceiling) or the first data stage slower than it.

    Returns:
        ``{"kind": "model-bound" | "data-bound" | "incomplete", "stage", "backend",
        "data_images_per_s", "model_images_per_s", "text", "warnings"}``.
    """
    ceiling = run.find("train", "alone")
    ours = [r for r in run.results if r.mode == "cumulative" and r.backend not in ("", "baseline")]
    # The backend to judge is the one that trains fastest (or, without a training row, feeds fastest).
    for stage in ("train", "recipe", "crops"):
        candidates = [r for r in ours if r.stage == stage]
        if candidates:
            backend = max(candidates, key=_rate).backend
            break
    else:
        backend = None
    chain = [r for r in run.results if r.mode == "cumulative" and r.stage in DATA_STAGES
             and r.backend in ("", backend)]
    chain.sort(key=lambda r: DATA_STAGES.index(r.stage))
    result: dict[str, Any] = {"kind": "incomplete", "stage": None, "backend": backend,
                              "data_images_per_s": None, "model_images_per_s": None,
                              "warnings": noise_warnings(run)}
    if not ceiling:
        last = chain[-1] if chain else None
        result["text"] = "no verdict: the model step was not measured" + (
            f" (data reaches {rate_text(_rate(last))} img/s up to {VERDICT_NAMES[last.stage]})" if last else "")
        return result
    model = _rate(ceiling[0])
    result["model_images_per_s"] = model
    trained = [r for r in ours if r.stage == "train" and r.backend == backend]
    # The culprit starts the run of stages, up to the last one, that all stay below the model: a
    # proxy stage (read, decode) that is slow does not count when the backend's own later
    # stage is fast (DALI decodes on the GPU, say).
    slower: list[StageResult] = []
    for r in reversed(chain):
        if _rate(r) >= model:
            break
        slower.insert(0, r)
    model_name = run.config.model
    if trained and _rate(trained[0]) >= MODEL_BOUND_FRACTION * model:
        fed = _rate(trained[0])
        share = f"{100 * fed / model:.0f}% of" if fed < model else "as fast as"
        result.update(kind="model-bound", stage="train", data_images_per_s=fed,
                      text=f"model-bound: {model_name} trains at {rate_text(fed)} img/s fed by the {backend} "
                           f"loader, {share} its {rate_text(model)} img/s on synthetic batches")
    elif slower:
        first = slower[0]
        result.update(kind="data-bound", stage=first.stage, data_images_per_s=_rate(first),
                      text=f"data-bound by {VERDICT_NAMES[first.stage]}: {rate_text(_rate(first))} img/s "
                           f"vs model {rate_text(model)} img/s")
    elif trained:
        fed = _rate(trained[0])
        result.update(kind="data-bound", stage="contention", data_images_per_s=fed,
                      text=f"data-bound by contention: {rate_text(fed)} img/s fed by the {backend} loader vs "
                           f"model {rate_text(model)} img/s; each data stage keeps up alone, but loader and "
                           f"model share the same cores/GPU")
    else:
        slowest = min(chain, key=_rate) if chain else None
        result.update(kind="model-bound", stage="train",
                      text=f"model-bound: model {rate_text(model)} img/s" +
                           (f", every data stage is faster (slowest: {slowest.label} "
                            f"{rate_text(_rate(slowest))} img/s)" if slowest else ""))
    return result


def noise_warnings(run: BenchRun) -> list[str]:
    """Signs that the figures are not to be trusted: wide spreads, a ceiling below a fed run."""
    warnings = []
    noisy = [r for r in run.results
             if (r.measurement.spread[1] - r.measurement.spread[0]) > NOISY_SPREAD * _rate(r)]
    if noisy:
        warnings.append(f"{len(noisy)} of {len(run.results)} rows vary by more than {100 * NOISY_SPREAD:.0f}% "
                        f"between repetitions (a busy machine?); raise --iters and --repeats")
    ceiling = run.find("train", "alone")
    fed = [r for r in run.find("train", "cumulative") if ceiling and _rate(r) > 1.1 * _rate(ceiling[0])]
    if fed:
        warnings.append(f"training fed by the {fed[0].backend} loader measured faster than the model's ceiling "
                        f"on synthetic batches: conditions changed during the run; measure again")
    return warnings


def to_json(run: BenchRun) -> dict[str, Any]:
    """The run as a JSON-ready dict (format ``ecomaug-bench`` version 1)."""
    config = run.config
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"shards": str(config.shards), "device": str(config.device), "backends": list(config.backends),
                     "stages": list(config.stages), "batch_size": config.batch_size,
                     "crop_size": config.crop_size, "model": config.model, "warmup": config.warmup,
                     "iters": config.iters, "repeats": config.repeats, "num_workers": config.num_workers,
                     "queue_size": config.queue_size, "amp": config.amp, "seed": config.seed},
        "conditions": run.conditions,
        "shards": run.shards,
        "results": [r.as_dict() for r in run.results],
        "unavailable": [u.as_dict() for u in run.unavailable],
        "baseline_ratios": baseline_ratios(run),
        "verdict": verdict(run),
    }


def conditions_text(run: BenchRun) -> str:
    """The conditions a reader needs before trusting any figure, a few lines."""
    info = run.conditions
    device = info.get("device_name") or info.get("device")
    libraries = ", ".join(f"{name} {info[name]}" for name in
                          ("torch", "torchvision", "timm", "kornia", "webdataset", "PIL", "nvidia.dali")
                          if info.get(name))
    samples = run.shards.get("samples")
    return "\n".join([
        f"device: {device} | CPU: {info.get('cpu_name')} x {info['cpu_count']} | "
        f"torch threads: {info['torch_threads']} | "
        f"loader workers: {info['loader_workers']} | python {info['python']}",
        f"batch {info['batch_size']} x 2 views, crop {info['crop_size']} px, model {info['model']}"
        f"{' (bf16 autocast)' if info.get('amp') else ''}, warm-up {info['warmup_batches']} batches, "
        f"{info['repeats']} repeats x {info['iters']} batches",
        f"shards: {run.shards['source']} ({run.shards['shards']} tars"
        f"{f', {samples:,} samples' if samples else ''})",
        f"libraries: {libraries}",
    ])


def table_text(run: BenchRun) -> str:
    """The results as a fixed-width table, then the baseline ratios and the verdict line."""
    header = ("stage", "mode", "img/s", "spread (min-max)", "ms/batch", "data wait")
    rows: list[tuple[str, ...]] = []
    for r in run.results:
        low, high = r.measurement.spread
        ms = r.as_dict()["ms_per_batch"]
        rows.append((r.label, r.mode, rate_text(_rate(r)), f"{rate_text(low)}-{rate_text(high)}",
                     f"{ms:,.1f}", "-" if r.data_wait is None else f"{100 * r.data_wait:.0f}%"))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    align = ["<", "<", ">", ">", ">", ">"]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths)).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in rows]
    for u in run.unavailable:
        label = f"{u.stage} [{u.backend}]" if u.backend else u.stage
        lines.append(f"{label:<{widths[0]}}  {u.mode:<{widths[1]}}  unavailable: {u.reason}")
    ratios = baseline_ratios(run)
    if ratios:
        workers = run.conditions.get("loader_workers")
        lines.append("")
        lines.append(f"vs baseline (webdataset + Pillow + torchvision, {workers} workers), decode + 2 crops: " +
                     ", ".join(f"{backend} {ratio:.2f}x" for backend, ratio in ratios.items()))
    lines.append("")
    judged = verdict(run)
    lines.append(f"verdict: {judged['text']}")
    lines += [f"warning: {warning}" for warning in judged["warnings"]]
    return "\n".join(lines)


def write_chart(run: BenchRun, path: str | os.PathLike) -> Path:
    """A horizontal bar chart of images/s (median, whiskers at min and max), on a log axis.

    Rows are grouped (alone; cumulative without a loader; then one group per loader), and the
    model's ceiling is a dashed line: every data bar left of it starves the model.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    results = list(run.results)
    if not results:
        raise ValueError("nothing was measured: no chart to draw")
    colors = {"alone": "#9ecae1", "cumulative": "#2171b5", "baseline": "#969696", "ceiling": "#cb181d"}
    # One slot per row, and an empty slot between groups, counted from the top.
    slots, groups, previous = [], [], None
    for r in results:
        group = (r.mode, r.backend)
        if previous is not None and group != previous:
            slots.append(None)
        slots.append(r)
        previous = group
    labels, positions, medians, lows, highs, bar_colors = [], [], [], [], [], []
    for slot, r in enumerate(slots):
        if r is None:
            continue
        kind = ("baseline" if r.backend == "baseline" else
                "ceiling" if (r.stage, r.mode) == ("train", "alone") else r.mode)
        labels.append(f"{r.label}  ({'alone' if r.mode == 'alone' else 'from tars'})")
        positions.append(len(slots) - 1 - slot)
        medians.append(_rate(r))
        low, high = r.measurement.spread
        lows.append(_rate(r) - low)
        highs.append(high - _rate(r))
        bar_colors.append(colors[kind])
    figure, axis = plt.subplots(figsize=(11, 2.2 + 0.36 * len(slots)), dpi=110)
    axis.barh(positions, medians, height=0.7, color=bar_colors, xerr=[lows, highs], capsize=3,
              error_kw={"elinewidth": 1, "ecolor": "#333333"})
    axis.set_yticks(positions, labels, fontsize=9)
    axis.set_xscale("log")
    smallest, largest = min(medians), max(m + h for m, h in zip(medians, highs))
    axis.set_xlim(smallest / 2, largest * 5)
    axis.set_ylim(-0.7, len(slots) - 0.3)
    for position, median, high in zip(positions, medians, highs):
        axis.text((median + high) * 1.1, position, rate_text(median), va="center", fontsize=9)
    ceiling = run.find("train", "alone")
    if ceiling:
        axis.axvline(_rate(ceiling[0]), color=colors["ceiling"], linestyle="--", linewidth=1)
    axis.set_xlabel("images/s (median over repeats, whiskers: min-max; log scale)")
    info = run.conditions
    heading = (f"ecomaug bench: {info.get('device_name') or info.get('device')}, {info['cpu_count']} CPUs "
               f"({info['torch_threads']} torch threads, {info['loader_workers']} loader workers), "
               f"batch {info['batch_size']}, crop {info['crop_size']} px, {info['model']}")
    axis.set_title(heading + "\n" + textwrap.fill(verdict(run)["text"], 120), fontsize=10, loc="left")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in colors]
    figure.legend(handles, ["stage alone (in memory)", "cumulative (streamed from the tars)",
                            "baseline loader", "model ceiling (dashed line)"],
                  loc="lower center", ncol=4, fontsize=8, frameon=False)
    axis.grid(axis="x", which="major", alpha=0.3)
    figure.tight_layout(rect=(0, 0.35 / figure.get_figheight(), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    return path


def write_outputs(run: BenchRun, out: str | os.PathLike) -> dict[str, Path]:
    """Write ``bench.json`` and ``bench.png`` into ``out``; returns their paths."""
    from loaders.manifest import write_json_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = to_json(run)
    _check_finite(payload)
    write_json_atomic(out / "bench.json", payload)
    paths = {"json": out / "bench.json"}
    if run.results:
        paths["chart"] = write_chart(run, out / "bench.png")
    return paths


def _check_finite(payload: Any, where: str = "") -> None:
    # JSON has no NaN or infinity; a non-finite figure means a timing bug, so say where.
    if isinstance(payload, float) and not math.isfinite(payload):
        raise ValueError(f"non-finite figure at {where or 'top level'} in the benchmark report")
    if isinstance(payload, dict):
        for key, value in payload.items():
            _check_finite(value, f"{where}.{key}")
    elif isinstance(payload, list):
        for index, value in enumerate(payload):
            _check_finite(value, f"{where}[{index}]")
