"""The robustness report: recall per disturbance for several models side by side.

:func:`evaluate_models` embeds one :class:`~ecomaug.evaluation.queries.EvalSet` with each model
and scores every query set against the clean gallery; :func:`write_report` turns the result into
a printed table, ``report.json``, a bar chart ``recall.png`` and ``examples.html`` (example
queries with each model's top 5, thumbnails embedded).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from ecomaug.evaluation.embed import EmbeddingModel, ReadReport, decodable_samples, embed_samples
from ecomaug.evaluation.queries import EvalSet
from ecomaug.evaluation.retrieval import retrieve, summarize
from ecomaug.evaluation.uncertainty import report_lines, report_warning, summary_error

INDEPENDENCE_NOTE = (
    "The query disturbances (ecomaug.evaluation.disturbances) are implemented independently of "
    "the training augmentations (ecomaug.augmentation, ecomaug.recipes): OpenCV camera-tilt "
    "perspective with outward corners, text watermarks in other fonts and words (diagonal, "
    "corner, tiled), HSV hue turns of the item only, multi-item canvases, and a JPEG re-encode "
    "as the control. The recall below therefore does not only measure memorised training "
    "transforms.")
KS = (1, 5, 10)
METRICS = tuple(f"recall@{k}" for k in KS) + ("mAP",)


@dataclass
class ModelSpec:
    """One model of the report: a label and how to load it (only when its turn comes)."""

    label: str
    load: Callable[[], EmbeddingModel]
    kind: str = ""


@dataclass
class ModelResult:
    """The scores of one model: ``summaries[disturbance]`` and the top-k of every query."""

    label: str
    info: dict[str, Any]
    summaries: dict[str, dict[str, Any]]
    topk: dict[str, np.ndarray] = field(default_factory=dict)
    topk_scores: dict[str, np.ndarray] = field(default_factory=dict)


def evaluate_models(eval_set: EvalSet, models: Sequence[ModelSpec], *, batch_size: int = 64,
                    group_by: Sequence[str] = ("region",), backend: str = "torch",
                    query_regions: str = "none", progress: bool = True) -> list[ModelResult]:
    """Embed gallery and query sets with each model (one in memory at a time) and score them.

    Args:
        eval_set: from :func:`~ecomaug.evaluation.queries.build_eval_set`.
        models: the models, in report order.
        batch_size: images per forward pass.
        group_by: metadata columns of the queries to break the metrics down by (those absent
            from the metadata are skipped).
        backend: retrieval backend, ``"torch"`` or ``"faiss"``.
        query_regions: ``"none"`` (one embedding per query), ``"items"`` or ``"grid"``: each
            query also embedded by its item regions (proposals or layout cells), scored by its
            best region (:mod:`ecomaug.evaluation.regions`; exact search only).
        progress: show progress bars.
    """
    from ecomaug.evaluation.regions import QUERY_REGIONS, embed_regions, retrieve_regions

    if query_regions not in QUERY_REGIONS:
        raise ValueError(f"query_regions must be one of {QUERY_REGIONS}; got {query_regions!r}")
    if not models:
        raise ValueError("no models to evaluate: give --model and/or --random-init")
    labels = [spec.label for spec in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique; got {labels} (name them LABEL=PATH)")
    gallery_items = [str(meta["item_id"]) for _, meta, _ in eval_set.gallery]
    results = []
    for spec in models:
        model = spec.load()
        gallery = embed_samples(model, eval_set.gallery, batch_size=batch_size, progress=progress,
                                total=len(eval_set.gallery), description=f"{spec.label}: gallery")
        result = ModelResult(label=spec.label, info={**model.info(), "kind": spec.kind},
                             summaries={})
        for name, samples in eval_set.queries.items():
            metas = [meta for _, meta, _ in samples]
            items = [str(meta["item_id"]) for meta in metas]
            if query_regions != "none":
                regions = embed_regions(model, samples, batch_size=batch_size, progress=progress,
                                        mode=query_regions,
                                        description=f"{spec.label}: {name} regions")
                ranking = retrieve_regions(regions, items, gallery.vectors.to(model.device),
                                           gallery_items, depth=max(KS))
            else:
                queries = embed_samples(model, samples, batch_size=batch_size, progress=progress,
                                        total=len(samples), description=f"{spec.label}: {name}")
                ranking = retrieve(queries.vectors.to(model.device), items,
                                   gallery.vectors.to(model.device), gallery_items, depth=max(KS),
                                   backend=backend)
            groups = {column: [meta.get(column, "") for meta in metas] for column in group_by
                      if any(column in meta for meta in metas)}
            result.summaries[name] = summarize(ranking, ks=KS, groups=groups)
            result.summaries[name]["recall@1_standard_error"] = summary_error(result.summaries[name])
            result.topk[name] = ranking.topk_indices
            result.topk_scores[name] = ranking.topk_scores
        results.append(result)
        del model
    return results


def format_table(results: Sequence[ModelResult], *, num_items: int | None = None) -> str:
    """One block per metric: a row per model, a column per disturbance; under it recall@1's standard
    error and, on too few ``num_items`` or queries, :func:`~ecomaug.evaluation.uncertainty.report_warning`."""
    disturbances = list(results[0].summaries)
    label_width = max(12, *(len(r.label) for r in results))
    widths = [max(9, len(name)) for name in disturbances]
    lines = []
    for metric in METRICS:
        header = f"{metric:<{label_width}}  " + "  ".join(
            f"{name:>{width}}" for name, width in zip(disturbances, widths))
        lines += [header, "-" * len(header)]
        for result in results:
            cells = [f"{result.summaries[name][metric]:>{width}.3f}"
                     for name, width in zip(disturbances, widths)]
            lines.append(f"{result.label:<{label_width}}  " + "  ".join(cells))
        lines.append("")
    counts = results[0].summaries[disturbances[0]]
    lines.append(f"{counts['num_queries']} queries per disturbance; metrics by item_id against a "
                 "clean gallery of one image per item.")
    return "\n".join(lines + report_lines(results, num_items=num_items))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def plot_recall(results: Sequence[ModelResult], path: str | os.PathLike) -> Path:
    """Grouped bars: recall@1 and mAP per disturbance, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    disturbances = list(results[0].summaries)
    positions = np.arange(len(disturbances))
    width = 0.8 / len(results)
    figure, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(disturbances)), 4), sharey=True)
    for axis, metric in zip(axes, ("recall@1", "mAP")):
        for index, result in enumerate(results):
            values = [result.summaries[name][metric] for name in disturbances]
            axis.bar(positions + (index - (len(results) - 1) / 2) * width, values, width,
                     label=result.label)
        axis.set_xticks(positions, [name.replace("_", "-") for name in disturbances])
        axis.set_title(f"{metric} by disturbance")
        axis.set_ylim(0, 1)
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("score")
    axes[1].legend(fontsize="small", loc="upper right")
    figure.suptitle("Item matching under disturbances (independent of the training transforms)",
                    fontsize="medium")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _thumbnail(data: bytes, size: int = 96) -> str:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image = ImageOps.contain(image, (size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_examples_page(eval_set: EvalSet, results: Sequence[ModelResult],
                        path: str | os.PathLike, *, per_disturbance: int = 3, top: int = 5) -> Path:
    """An HTML page: example queries, the item's gallery image and each model's top ``top``."""
    gallery_by_item = {str(meta["item_id"]): data for _, meta, data in eval_set.gallery}
    thumbs: dict[int, str] = {}

    def gallery_thumb(position: int) -> str:
        if position not in thumbs:
            thumbs[position] = _thumbnail(eval_set.gallery[position][2])
        return thumbs[position]

    rows = []
    for name, samples in eval_set.queries.items():
        picks = np.linspace(0, len(samples) - 1, num=min(per_disturbance, len(samples)))
        rows.append(f"<h2>{html.escape(name)}</h2>")
        for query_index in sorted({int(round(p)) for p in picks}):
            key, meta, data = samples[query_index]
            item = str(meta["item_id"])
            cells = [f'<td><img src="{_thumbnail(data)}"><br>query<br><small>{html.escape(key)}'
                     f"</small></td>",
                     f'<td class="expected"><img src="{_thumbnail(gallery_by_item[item])}">'
                     f"<br>item {html.escape(item)}</td>"]
            for result in results:
                found = []
                for rank, position in enumerate(result.topk[name][query_index][:top].tolist()):
                    if position < 0:
                        continue
                    hit = str(eval_set.gallery[position][1]["item_id"]) == item
                    score = result.topk_scores[name][query_index][rank]
                    found.append(f'<span class="{"hit" if hit else "miss"}"><img '
                                 f'src="{gallery_thumb(position)}"><br>{score:.2f}</span>')
                cells.append(f"<td><b>{html.escape(result.label)}</b><br>{''.join(found)}</td>")
            rows.append(f"<table><tr>{''.join(cells)}</tr></table>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ecomaug robustness examples</title>
<style>body{{font-family:sans-serif;margin:1em}} td{{vertical-align:top;padding:4px;
text-align:center;font-size:12px}} span{{display:inline-block;margin:2px}}
.hit img{{border:3px solid #2a2}} .miss img{{border:3px solid #c22}}
.expected img{{border:3px dashed #888}}</style></head><body>
<h1>Example queries and their top {top}</h1>
<p>{html.escape(INDEPENDENCE_NOTE)}</p>
<p>Green: the query's item; red: another item; dashed: the item's gallery image.
Numbers are cosine similarities.</p>
{''.join(rows)}
</body></html>
"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def write_report(eval_set: EvalSet, results: Sequence[ModelResult], out_dir: str | os.PathLike,
                 *, examples_per_disturbance: int = 3) -> dict[str, Path]:
    """Write ``report.json``, ``report.txt`` (the table), ``recall.png`` and ``examples.html``.

    Returns:
        ``{"json", "table", "chart", "examples"}`` -> path.
    """
    from loaders.manifest import write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results, num_items=eval_set.num_items)
    payload = {
        "format": "ecomaug-eval-report", "format_version": 1,
        "note": INDEPENDENCE_NOTE, "protocol": eval_set.protocol,
        "metrics": list(METRICS),
        "models": [{"label": r.label, **r.info} for r in results],
        "results": {r.label: _json_safe(r.summaries) for r in results},
        "warning": report_warning(results, num_items=eval_set.num_items),
    }
    paths = {"json": out / "report.json", "table": out / "report.txt", "chart": out / "recall.png",
             "examples": out / "examples.html"}
    write_json_atomic(paths["json"], payload)
    paths["table"].write_text(table + "\n\n" + INDEPENDENCE_NOTE + "\n", encoding="utf-8")
    plot_recall(results, paths["chart"])
    write_examples_page(eval_set, results, paths["examples"],
                        per_disturbance=examples_per_disturbance)
    return paths


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``report.json`` back."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _run_kind(source: Path) -> str:
    """What a run was trained as, from its ``config.json`` (``moco/ecom``, ``siamese/...``)."""
    for directory in (source, source.parent, source.parent.parent):
        config_path = directory / "config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                continue
            if "objective" in config:
                return f"{config['objective']}/{config.get('recipe', '?')}"
    return "trained"


def model_spec(text: str, *, device: Any, input_size: int | None = None) -> ModelSpec:
    """``[LABEL=]PATH`` (export dir, run dir or checkpoint) -> a lazily loaded :class:`ModelSpec`."""
    from ecomaug.evaluation.embed import load_model

    label, separator, location = text.partition("=")
    if not separator:
        label, location = "", text
    path = Path(location)
    if not path.exists():
        raise FileNotFoundError(2, "No such model (export dir, run dir or checkpoint)", str(path))
    if not label:
        label = path.parent.name if path.name in ("export", "checkpoints") else path.name
        if path.is_file():
            label = f"{path.parent.parent.name}:{path.stem}"
    return ModelSpec(label=label, kind=_run_kind(path),
                     load=lambda: load_model(path, device=device, input_size=input_size))


def random_init_spec(model_name: str, *, device: Any, input_size: int = 224,
                     seed: int = 0, extra_sizes: Sequence[int] = ()) -> ModelSpec:
    """The random-init baseline as a :class:`ModelSpec`."""
    from ecomaug.evaluation.embed import random_init_model

    return ModelSpec(label=f"random-init {model_name}", kind="random-init",
                     load=lambda: random_init_model(model_name, device=device, input_size=input_size,
                                                    seed=seed, extra_sizes=extra_sizes))


def pretrained_spec(model_name: str, *, device: Any, input_size: int = 224,
                    extra_sizes: Sequence[int] = ()) -> ModelSpec:
    """The frozen pretrained baseline (ImageNet weights, untrained by us) as a :class:`ModelSpec`."""
    from ecomaug.evaluation.models import pretrained_model

    return ModelSpec(label=f"frozen pretrained {model_name}", kind="pretrained",
                     load=lambda: pretrained_model(model_name, device=device, input_size=input_size,
                                                   extra_sizes=extra_sizes))


def robustness_report(gallery: str | os.PathLike, models: Sequence[ModelSpec],
                      out_dir: str | os.PathLike, *, disturbances: Sequence[str] | None = None,
                      seed: int = 0, max_items: int | None = None,
                      max_queries_per_item: int | None = None, batch_size: int = 64,
                      group_by: Sequence[str] | None = None, backend: str = "torch",
                      examples_per_disturbance: int = 3, query_regions: str = "items",
                      progress: bool = True, read_report: ReadReport | None = None
                      ) -> tuple[str, dict[str, Path]]:
    """From shards (or an ``items.csv``) with ``item_id`` to the written report.

    Args:
        gallery: shards / manifest / ``items.csv`` holding several images per item.
        models: the models, in report order (see :func:`model_spec`, :func:`random_init_spec`).
        out_dir: where the report goes.
        disturbances: subset of the disturbances (all when None).
        seed: seed of the disturbances and of the item subset.
        max_items: evaluate on a seeded subset of this many items.
        max_queries_per_item: cap on an item's queries.
        batch_size: images per forward pass.
        group_by: query metadata columns for the per-group breakdown; each must exist (checked
            before any model runs). None: ``region`` where the queries have it.
        backend: ``"torch"`` (exact, chunked) or ``"faiss"``.
        examples_per_disturbance: example queries per disturbance on the examples page.
        query_regions: ``"items"`` (score each query by its best item region), ``"none"`` or
            ``"grid"``; see :func:`evaluate_models`.
        progress: show progress bars.
        read_report: a :class:`~ecomaug.evaluation.sources.ReadReport` where what the gallery
            did not hold or could not be read or decoded is recorded (None: that raises).

    Returns:
        ``(table text, {"json", "table", "chart", "examples"} -> path)``.

    Raises:
        ValueError: a ``group_by`` column that no query has (the message lists those that exist).
    """
    from ecomaug.evaluation.disturbances import DISTURBANCES
    from ecomaug.evaluation.embed import iter_data
    from ecomaug.evaluation.queries import build_eval_set

    if not models:
        raise ValueError("no models to evaluate: give --model and/or --random-init")
    gallery_samples = decodable_samples(iter_data(gallery, report=read_report), read_report)
    eval_set = build_eval_set(gallery_samples, disturbances=disturbances or DISTURBANCES,
                              seed=seed, max_items=max_items,
                              max_queries_per_item=max_queries_per_item, progress=progress)
    columns = sorted({name for samples in eval_set.queries.values() for _, meta, _ in samples for name in meta})
    if group_by is None:
        group_by = tuple(name for name in ("region",) if name in columns)
    unknown = [name for name in group_by if name not in columns]
    if unknown:
        raise ValueError(f"--group-by {','.join(unknown)}: no such column in the queries' metadata; "
                         f"the columns are {', '.join(columns) or '(none)'}")
    results = evaluate_models(eval_set, models, batch_size=batch_size, group_by=group_by,
                              backend=backend, progress=progress, query_regions=query_regions)
    paths = write_report(eval_set, results, out_dir,
                         examples_per_disturbance=examples_per_disturbance)
    return format_table(results, num_items=eval_set.num_items), paths
