"""report.html and the score histogram: check the threshold by looking at pairs around it.

The page says which score the threshold applies to and whether it was given, calibrated or the
default, then shows, side by side across the full width, a sample of pairs just above and just
below the threshold (B's nearest A listing for each) and the top gaps, with thumbnails embedded
(one self-contained file); ``scores.png`` holds the histograms of each listing's best score, raw
cosine and normalised side by side, drawn as outlines, with the threshold marked.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ecomaug.matching.catalogue import Catalogue, read_images
from ecomaug.matching.search import SearchResult

THUMBNAIL = 128


def _thumbnail(data: bytes | None) -> str:
    if data is None:
        return '<div class="none">no image</div>'
    try:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        image.thumbnail((THUMBNAIL, THUMBNAIL))
    except (OSError, ValueError):
        return '<div class="none">unreadable</div>'
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _caption(catalogue: Catalogue, row: int) -> str:
    meta = catalogue.meta[row]
    details = ", ".join(f"{c}={meta[c]}" for c in ("item_id", "shop", "price", "title") if c in meta)
    return html.escape(f"{catalogue.keys[row]}" + (f" ({details})" if details else ""))


def histogram(best: dict[str, dict[str, np.ndarray]], *, threshold: float, score: str,
              path: Path) -> Path:
    """Each listing's best score in the other catalogue, one panel per score side by side.

    Each panel draws A's and B's best scores as outlines (neither hides the other); the threshold
    is marked on the panel of the score it applies to.

    Args:
        best: per score (``"cosine"``, ``"normalised"``), per series label, the best scores.
        threshold: the run's threshold. score: the score it applies to.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(best), figsize=(6 * len(best), 3.5), dpi=100, squeeze=False)
    for axis, (name, series) in zip(axes[0], best.items()):
        finite = [values[np.isfinite(values)] for values in series.values()]
        pooled = np.concatenate(finite) if finite else np.zeros(0)
        if pooled.size:
            # One shared range so the outlines compare; normalised scores far below the
            # background (they can reach -10) would squash the part that matters.
            low, high = max(float(pooled.min()), -1.0), float(pooled.max())
            if name == score:
                low, high = min(low, threshold), max(high, threshold)
            if high - low < 1e-6:  # identical scores (one item, a catalogue against itself)
                low, high = low - 0.01, high + 0.01
            for (label, values), style in zip(zip(series, finite), ("-", "--")):
                axis.hist(np.clip(values, low, high), bins=50, range=(low, high), histtype="step",
                          linewidth=1.8, linestyle=style, label=label)
        if name == score:
            axis.axvline(threshold, color="red", linestyle=":", linewidth=2,
                         label=f"threshold {threshold:.4f}")
        axis.set_xlabel("cosine similarity" if name == "cosine" else
                        "normalised score (0 = background, 1 = identical)")
        axis.set_ylabel("listings")
        axis.set_title(f"{name} score" + (" (the threshold's)" if name == score else ""))
        axis.legend(loc="best")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


STYLE = ("body{font-family:sans-serif;margin:1em;max-width:none;width:auto}"
         "td{vertical-align:top;padding:4px;border-bottom:1px solid #ddd}table{width:100%;"
         "border-collapse:collapse}img{width:128px}img.plot{width:100%;height:auto}"
         "p{font-size:11px;margin:2px}.lead{font-size:15px}"
         ".columns{display:flex;flex-wrap:wrap;gap:2em}.columns>div{flex:1 1 560px;min-width:0}"
         ".above{background:#eef8ee}.below{background:#f8eeee}.gap{background:#eef0f8}"
         ".none{width:128px;height:64px;background:#eee;font-size:11px}")


def write_report(result: Any, a: Catalogue, b: Catalogue, *, ba: SearchResult,
                 best: dict[str, dict[str, np.ndarray]], order: list[int], component: np.ndarray,
                 sizes: np.ndarray, samples: int) -> list[str]:
    """Write ``report.html`` and ``scores.png`` into ``result.out_dir``; returns their names.

    Args:
        result: the :class:`~ecomaug.matching.match.MatchResult` (threshold, its score and source).
        a, b: the catalogues. ba: B's neighbours in A.
        best: per score, ``"A's best in B"`` and ``"B's best in A"`` (the latter indexes B's rows).
        order: gap rows of B in report order. component, sizes: B's clusters and their sizes.
        samples: pairs shown above and below the threshold (half each), and gaps.
    """
    out = Path(result.out_dir)
    histogram(best, threshold=result.threshold, score=result.score, path=out / "scores.png")
    # B listings ranked by how close their best score (the threshold's) is to it, above and below.
    decided = best[result.score]["B's best in A"]
    valid = np.nonzero(ba.indices[:, 0] >= 0)[0]
    above = valid[decided[valid] >= result.threshold]
    below = valid[decided[valid] < result.threshold]
    half = max(1, samples // 2)
    above = above[np.argsort(decided[above])][:half]
    below = below[np.argsort(-decided[below])][:half]
    gap_rows = order[:samples]
    wanted_b = set(above.tolist()) | set(below.tolist()) | set(gap_rows)
    wanted_a = {int(ba.indices[j, 0]) for j in wanted_b if ba.indices[j, 0] >= 0}
    images_a = read_images(a, [a.keys[i] for i in wanted_a])
    images_b = read_images(b, [b.keys[j] for j in wanted_b])
    cosine, normalised = best["cosine"]["B's best in A"], best["normalised"]["B's best in A"]

    def row(j: int, css: str, extra: str = "") -> str:
        i = int(ba.indices[j, 0])
        left = (_thumbnail(images_a.get(a.keys[i])) + f"<p>{_caption(a, i)}</p>") if i >= 0 else ""
        return (f'<tr class="{css}"><td>{left}</td><td>{_thumbnail(images_b.get(b.keys[j]))}'
                f'<p>{_caption(b, j)}</p></td><td>{normalised[j]:.4f}</td><td>{cosine[j]:.4f}'
                f'{extra}</td></tr>')

    head = "<tr><th>{}</th><th>{}</th><th>normalised</th><th>cosine</th></tr>"
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>ecomaug match</title><style>{STYLE}</style>",
        f"<h1>ecomaug match</h1><p class='lead'>threshold <b>{result.threshold:.4f}</b> on the "
        f"<b>{html.escape(result.score)}</b> score, <b>{html.escape(result.threshold_source)}</b>: "
        f"{html.escape(result.threshold_description)}.</p>",
        f"<p class='lead'>{result.pairs} pairs ({result.mutual_pairs} mutual) of "
        f"{result.a_listings} A and {result.b_listings} B listings; {result.gap_listings} gap "
        f"listings in {result.gap_clusters} gap clusters.</p>",
        *[f"<p class='lead'>Warning: {html.escape(note)}</p>" for note in result.notes],
        "<img class='plot' src='scores.png'>",
        "<div class='columns'><div><h2>Around the threshold</h2><p>Each B listing with its nearest "
        "A listing; green rows are called the same item, red ones are not. If red rows show one "
        "item, lower the threshold; if green rows show two, raise it.</p>",
        "<table>" + head.format("A (ours)", "B (theirs)"),
        *[row(int(j), "above") for j in above[::-1]], *[row(int(j), "below") for j in below],
        "</table></div><div><h2>Top gaps</h2><p>B listings with no match in A, most-listed "
        "clusters first.</p><table>" + head.format("nearest A", "B (gap)"),
        *[row(j, "gap", f"<br>cluster of {int(sizes[component[j]])}") for j in gap_rows],
        "</table></div></div>"]
    (out / "report.html").write_text("\n".join(parts) + "\n", encoding="utf-8")
    return ["report.html", "scores.png"]
