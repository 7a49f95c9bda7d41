"""report.html and the score histogram: check the threshold by looking at pairs around it.

The page shows, side by side, a sample of pairs just above and just below the threshold (B's
nearest A listing for each) and the top gaps, with thumbnails embedded (one self-contained
file); ``scores.png`` is the histogram of each listing's best score with the threshold marked.
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


def histogram(ab: SearchResult, ba: SearchResult, threshold: float, path: Path) -> Path:
    """Histogram of every A and B listing's best score in the other catalogue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    for result, label in ((ab, "A's best in B"), (ba, "B's best in A")):
        best = result.scores[:, 0]
        best = best[np.isfinite(best)]
        if best.size:
            # Identical scores (one item, or a catalogue matched with itself) leave no range to bin.
            low, high = float(best.min()), float(best.max())
            if high - low < 1e-6:
                low, high = low - 0.01, high + 0.01
            axis.hist(best, bins=50, range=(low, high), alpha=0.6, label=label)
    axis.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.4f}")
    axis.set_xlabel("cosine similarity")
    axis.set_ylabel("listings")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def write_report(result: Any, a: Catalogue, b: Catalogue, *, ab: SearchResult,
                 ba: SearchResult, pair_a: np.ndarray, pair_slot: np.ndarray,
                 order: list[int], component: np.ndarray, sizes: np.ndarray, samples: int,
                 seed: int) -> list[str]:
    """Write ``report.html`` and ``scores.png`` into ``result.out_dir``; returns their names."""
    out = Path(result.out_dir)
    histogram(ab, ba, result.threshold, out / "scores.png")
    # B listings ranked by how close their best score is to the threshold, above and below.
    best = ba.scores[:, 0]
    valid = np.nonzero(ba.indices[:, 0] >= 0)[0]
    above = valid[best[valid] >= result.threshold]
    below = valid[best[valid] < result.threshold]
    half = max(1, samples // 2)
    above = above[np.argsort(best[above])][:half]
    below = below[np.argsort(-best[below])][:half]
    gap_rows = order[:samples]
    wanted_b = set(above.tolist()) | set(below.tolist()) | set(gap_rows)
    wanted_a = {int(ba.indices[j, 0]) for j in wanted_b if ba.indices[j, 0] >= 0}
    images_a = read_images(a, [a.keys[i] for i in wanted_a])
    images_b = read_images(b, [b.keys[j] for j in wanted_b])

    def row(j: int, css: str, extra: str = "") -> str:
        i = int(ba.indices[j, 0])
        left = (_thumbnail(images_a.get(a.keys[i])) + f"<p>{_caption(a, i)}</p>") if i >= 0 else ""
        return (f'<tr class="{css}"><td>{left}</td><td>{_thumbnail(images_b.get(b.keys[j]))}'
                f'<p>{_caption(b, j)}</p></td><td>{best[j]:.4f}{extra}</td></tr>')

    state = "calibrated" if result.calibrated else "UNCALIBRATED"
    parts = [
        "<!doctype html><meta charset='utf-8'><title>ecomaug match</title><style>"
        "body{font-family:sans-serif;margin:1em}td{vertical-align:top;padding:4px;"
        "border-bottom:1px solid #ddd}img{width:128px}p{font-size:11px;max-width:260px;margin:2px}"
        ".above{background:#eef8ee}.below{background:#f8eeee}.gap{background:#eef0f8}"
        ".none{width:128px;height:64px;background:#eee;font-size:11px}</style>",
        f"<h1>ecomaug match</h1><p>threshold <b>{result.threshold:.4f}</b> ({state}: "
        f"{html.escape(result.threshold_source)}); {result.pairs} pairs ({result.mutual_pairs} "
        f"mutual) of {result.a_listings} A and {result.b_listings} B listings; "
        f"{result.gap_listings} gap listings in {result.gap_clusters} gap clusters.</p>",
        "<img src='scores.png' style='width:600px'>",
        "<h2>Around the threshold</h2><p>Each B listing with its nearest A listing; green rows "
        "are called the same item, red ones are not. If red rows show one item, lower the "
        "threshold; if green rows show two, raise it.</p>",
        "<table><tr><th>A (ours)</th><th>B (theirs)</th><th>score</th></tr>",
        *[row(int(j), "above") for j in above[::-1]], *[row(int(j), "below") for j in below],
        "</table><h2>Top gaps</h2><p>B listings with no match in A, most-listed clusters first."
        "</p><table><tr><th>nearest A</th><th>B (gap)</th><th>score</th></tr>",
        *[row(j, "gap", f"<br>cluster of {int(sizes[component[j]])}") for j in gap_rows],
        "</table>"]
    (out / "report.html").write_text("\n".join(parts) + "\n", encoding="utf-8")
    return ["report.html", "scores.png"]
