"""Precision/recall of watermark detection over thresholds, on a synthetic set with known marks.

Pool marks are pasted onto the bundled sample images at known places, scales and opacities;
clean images are kept beside them. Every detection at or above the coarse threshold is recorded
once, then precision, recall and the share of clean images that would be changed are computed
for each threshold. The recommended threshold is the lowest one whose precision is >= 0.99 and
that changes no clean image.

    python -m bench dewatermark-pr                       # synthetic marks, bundled sample
    python -m bench dewatermark-pr --marks ecomaug/assets/watermarks --feature gradient
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import click
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from bench.harness import BenchCommand
from bench.timing import conditions, measure
from ecomaug.paths import SAMPLE_DIR
from ecomaug.dewatermark import Dewatermarker, MarkPool, box_iou, scale_grid


def synthetic_marks() -> dict[str, Image.Image]:
    """Four RGBA marks like shops use: outlined text, a round logo, dark text, a translucent badge."""
    marks = {}
    font = ImageFont.load_default(size=22)
    small = ImageFont.load_default(size=15)

    image = Image.new("RGBA", (112, 30), (0, 0, 0, 0))
    ImageDraw.Draw(image).text((4, 2), "SHOP88", font=font, fill=(255, 255, 255, 255),
                               stroke_width=2, stroke_fill=(40, 40, 40, 255))
    marks["text_shop88"] = image

    image = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((3, 3, 52, 52), outline=(255, 255, 255, 255), width=5)
    draw.polygon([(28, 12), (42, 40), (14, 40)], fill=(255, 255, 255, 255))
    draw.text((22, 24), "M", font=small, fill=(30, 30, 30, 255))
    marks["logo_ring"] = image

    image = Image.new("RGBA", (124, 24), (0, 0, 0, 0))
    ImageDraw.Draw(image).text((3, 3), "(c) mystore", font=ImageFont.load_default(size=17),
                               fill=(20, 20, 30, 255))
    marks["text_mystore"] = image

    image = Image.new("RGBA", (84, 34), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((1, 1, 82, 32), radius=9, fill=(200, 30, 60, 150))
    draw.text((9, 7), "DEALZ", font=ImageFont.load_default(size=18), fill=(255, 255, 255, 255))
    marks["badge_dealz"] = image
    return marks


def busy_image(rng: random.Random, size: tuple[int, int] = (256, 256)) -> Image.Image:
    """A cluttered RGB image: gradient, shapes, lines, text and noise, JPEG-compressed."""
    width, height = size
    top = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    bottom = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (height, width, 3)).copy()
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    colour = lambda: tuple(rng.randint(0, 255) for _ in range(3))  # noqa: E731
    for _ in range(rng.randint(8, 16)):
        x0, y0 = rng.randint(-20, width), rng.randint(-20, height)
        box = (x0, y0, x0 + rng.randint(10, width // 2), y0 + rng.randint(10, height // 2))
        shape = rng.choice(["ellipse", "rectangle", "line", "text", "polygon"])
        if shape == "ellipse":
            draw.ellipse(box, fill=colour(), outline=colour(), width=rng.randint(1, 4))
        elif shape == "rectangle":
            draw.rectangle(box, fill=colour())
        elif shape == "line":
            draw.line(box, fill=colour(), width=rng.randint(1, 6))
        elif shape == "polygon":
            draw.polygon([(rng.randint(0, width), rng.randint(0, height)) for _ in range(5)], fill=colour())
        else:
            words = rng.choice(["SALE", "new arrival", "100% cotton", "SHOP now", "free ship", "ORIGINAL"])
            draw.text(box[:2], words, font=ImageFont.load_default(size=rng.randint(12, 28)), fill=colour())
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))
    image = image.filter(ImageFilter.GaussianBlur(0.6))
    return _jpeg(image, rng.randint(80, 92))


def paste_mark(image: Image.Image, mark: Image.Image, xy: tuple[int, int], scale: float,
               opacity: float) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Alpha-blend ``mark`` (RGBA) at ``scale`` and ``opacity`` onto ``image`` with its top-left at ``xy``.

    Returns:
        The marked RGB image and the pasted mark's box ``[x0, y0, x1, y1]`` (transparent borders trimmed).
    """
    mark = mark.crop(mark.getchannel("A").point(lambda a: 255 if a > 5 else 0).getbbox())
    size = (max(1, round(mark.width * scale)), max(1, round(mark.height * scale)))
    mark = mark.resize(size, Image.Resampling.LANCZOS)
    mark.putalpha(mark.getchannel("A").point(lambda a: round(a * opacity)))
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    layer.paste(mark, xy)
    marked = Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")
    return marked, (xy[0], xy[1], xy[0] + size[0], xy[1] + size[1])


@dataclass
class Case:
    """One image of the synthetic set; ``box``/``mark`` are None for a clean image."""

    image: Image.Image
    clean: Image.Image
    mark: str | None
    box: tuple[int, int, int, int] | None
    scale: float | None
    opacity: float | None


def backgrounds(count: int, seed: int) -> list[Image.Image]:
    """``count`` bundled sample images (cycled), or busy synthetic ones when the sample is absent."""
    files = sorted((SAMPLE_DIR / "images").glob("*.jpg")) if (SAMPLE_DIR / "images").is_dir() else []
    rng = random.Random(seed)
    if not files:
        return [busy_image(rng) for _ in range(count)]
    rng.shuffle(files)
    return [Image.open(files[i % len(files)]).convert("RGB") for i in range(count)]


def build_set(marks: dict[str, Image.Image], *, positives: int, negatives: int, seed: int,
              scale_range: tuple[float, float] = (0.6, 1.8),
              opacity_range: tuple[float, float] = (0.35, 1.0)) -> list[Case]:
    """Marked cases (a random mark at a random place, log-uniform scale, uniform opacity) and clean ones."""
    rng = random.Random(seed)
    images = backgrounds(positives + negatives, seed)
    names = sorted(marks)
    cases = []
    for index, background in enumerate(images):
        if index >= positives:
            cases.append(Case(background, background, None, None, None, None))
            continue
        name = names[index % len(names)]
        scale = float(np.exp(rng.uniform(np.log(scale_range[0]), np.log(scale_range[1]))))
        width = round(marks[name].width * scale)
        height = round(marks[name].height * scale)
        if width >= background.width or height >= background.height:
            scale = min(background.width / marks[name].width, background.height / marks[name].height) * 0.9
            width, height = round(marks[name].width * scale), round(marks[name].height * scale)
        xy = (rng.randint(0, background.width - width), rng.randint(0, background.height - height))
        opacity = rng.uniform(*opacity_range)
        marked, box = paste_mark(background, marks[name], xy, scale, opacity)
        marked = _jpeg(marked, rng.randint(80, 92))
        cases.append(Case(marked, background, name, box, scale, opacity))
    return cases


def curve(cases: Sequence[Case], detections: Sequence[list], thresholds: Sequence[float]) -> list[dict]:
    """Precision, recall and changed clean images at each threshold.

    A detection is a true positive when it is the first on a marked image with IoU > 0.5 against the
    pasted box; every other detection is a false positive (it would paint over something else).
    """
    positives = sum(case.box is not None for case in cases)
    negatives = len(cases) - positives
    rows = []
    for threshold in thresholds:
        true_pos = false_pos = clean_changed = right_mark = 0
        for case, found in zip(cases, detections):
            hits = [d for d in found if d.score >= threshold]
            matched = False
            for hit in hits:
                if case.box is not None and not matched and box_iou(hit.box, case.box) > 0.5:
                    matched = True
                    true_pos += 1
                    right_mark += hit.mark == case.mark
                else:
                    false_pos += 1
            clean_changed += case.box is None and bool(hits)
        rows.append({"threshold": round(threshold, 3),
                     "precision": true_pos / (true_pos + false_pos) if true_pos + false_pos else 1.0,
                     "recall": true_pos / positives if positives else 0.0,
                     "true_positives": true_pos, "false_positives": false_pos,
                     "right_mark": right_mark,
                     "clean_changed": clean_changed, "clean_images": negatives})
    return rows


def recall_by_opacity(cases: Sequence[Case], detections: Sequence[list], threshold: float) -> dict[str, dict]:
    """Recall at ``threshold`` per band of pasted opacity (faint marks are the hard ones)."""
    bands = {"0.35-0.5": (0.0, 0.5), "0.5-0.75": (0.5, 0.75), "0.75-1.0": (0.75, 1.01)}
    result = {}
    for band, (low, high) in bands.items():
        chosen = [(case, found) for case, found in zip(cases, detections)
                  if case.opacity is not None and low <= case.opacity < high]
        hits = sum(any(d.score >= threshold and box_iou(d.box, case.box) > 0.5 for d in found)
                   for case, found in chosen)
        result[band] = {"images": len(chosen), "recall": hits / len(chosen) if chosen else 0.0}
    return result


def pick_threshold(rows: Sequence[dict], min_precision: float = 0.99) -> dict | None:
    """The lowest threshold with precision >= ``min_precision`` that changes no clean image."""
    for row in rows:
        if row["precision"] >= min_precision and row["clean_changed"] == 0:
            return row
    return None


def residuals(cases: Sequence[Case], dewatermarker: Dewatermarker) -> dict:
    """Mean absolute difference to the clean image inside the true box, before and after removal."""
    before, after = [], []
    for case in cases:
        if case.box is None:
            continue
        cleaned, _, changed = dewatermarker(case.image)
        if not changed:
            continue
        x0, y0, x1, y1 = case.box
        clean = np.asarray(case.clean, np.float32)[y0:y1, x0:x1]
        before.append(float(np.abs(np.asarray(case.image, np.float32)[y0:y1, x0:x1] - clean).mean()))
        after.append(float(np.abs(np.asarray(cleaned, np.float32)[y0:y1, x0:x1] - clean).mean()))
    if not before:
        return {"images": 0}
    return {"images": len(before), "marked_mean_abs_diff": statistics.mean(before),
            "cleaned_mean_abs_diff": statistics.mean(after)}


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


@click.command("dewatermark-pr", cls=BenchCommand)
@click.option("--marks", "marks_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Folder of mark images (default: four synthetic marks made in code).")
@click.option("--positives", default=240, show_default=True, help="Marked images.")
@click.option("--negatives", default=240, show_default=True, help="Clean images.")
@click.option("--feature", type=click.Choice(["gray", "gradient"]), default="gradient", show_default=True)
@click.option("--min-scale", default=0.6, show_default=True,
              help="Smallest pasted mark width, as a multiple of the mark file's width.")
@click.option("--max-scale", default=1.8, show_default=True, help="Largest pasted mark width.")
@click.option("--seed", default=0, show_default=True)
@click.option("--min-precision", default=0.99, show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results here.")
def main(marks_dir: Path | None, positives: int, negatives: int, feature: str, min_scale: float,
         max_scale: float, seed: int, min_precision: float, json_out: Path | None) -> None:
    """Measure the precision/recall curve of `Dewatermarker` and recommend a threshold."""
    if marks_dir is None:
        mark_images = synthetic_marks()
    else:
        mark_images = {p.stem: Image.open(p).convert("RGBA") for p in sorted(marks_dir.iterdir())
                       if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")}
    pool = MarkPool.from_images(mark_images)
    cases = build_set(mark_images, positives=positives, negatives=negatives, seed=seed,
                      scale_range=(min_scale, max_scale))
    # The searched scales cover the pasted ones with a margin (0.5 .. 2.0 for the defaults).
    scales = scale_grid(min_scale / 1.2, max_scale * 1.1)
    detector = Dewatermarker(pool, feature=feature, scales=scales)
    floor = detector.coarse_threshold
    start = time.perf_counter()
    detections = [detector.detect(case.image, threshold=floor) for case in cases]
    seconds = time.perf_counter() - start
    thresholds = [round(floor + 0.01 * i, 3) for i in range(int(round((1.0 - floor) / 0.01)) + 1)]
    rows = curve(cases, detections, thresholds)
    chosen = pick_threshold(rows, min_precision)

    clean_cases = [c for c in cases if c.box is None][:24] or cases[:24]
    marked_cases = [c for c in cases if c.box is not None][:24] or cases[:24]
    timings = {name: measure(name, lambda group=group: [detector(c.image) for c in group],
                             items=len(group), warmup=1, repeats=3).as_dict()
               for name, group in (("clean", clean_cases), ("marked", marked_cases))}
    at_chosen = Dewatermarker(pool, feature=feature, scales=scales,
                              threshold=chosen["threshold"] if chosen else detector.threshold)
    removal = residuals(cases, at_chosen)
    by_opacity = recall_by_opacity(cases, detections, at_chosen.threshold)

    print(f"{len(pool)} marks ({', '.join(pool.names)}), {positives} marked + {negatives} clean images, "
          f"feature={feature}, background={'sample' if (SAMPLE_DIR / 'images').is_dir() else 'synthetic'}, "
          f"pasted scales {min_scale}..{max_scale}, searched {scales[0]}..{scales[-1]} ({len(scales)})")
    print(f"{'threshold':>9} {'precision':>9} {'recall':>7} {'TP':>5} {'FP':>5} {'clean changed':>14}")
    for row in rows:
        if round(row["threshold"] * 100) % 5 == 0 or row is chosen:
            mark = "  <- chosen" if row is chosen else ""
            print(f"{row['threshold']:>9.2f} {row['precision']:>9.3f} {row['recall']:>7.3f} "
                  f"{row['true_positives']:>5} {row['false_positives']:>5} "
                  f"{row['clean_changed']:>6}/{row['clean_images']}{mark}")
    rule = f"lowest threshold with precision >= {min_precision} and no clean image changed"
    print(f"rule: {rule}; chosen: {chosen['threshold'] if chosen else None}")
    print(f"removal (chosen threshold): {removal}")
    print("recall by opacity (chosen threshold): " + ", ".join(
        f"{band}: {v['recall']:.2f} of {v['images']}" for band, v in by_opacity.items()))
    for name, timing in timings.items():
        per_image = [1000.0 * s / timing["items_per_repeat"] for s in timing["seconds"]]
        print(f"ms/image ({name}): median {statistics.median(per_image):.1f} "
              f"(min {min(per_image):.1f}, max {max(per_image):.1f})")
    result = {"conditions": conditions(), "feature": feature, "marks": pool.names,
              "paste_scales": [min_scale, max_scale], "search_scales": list(scales),
              "positives": positives, "negatives": negatives, "seed": seed, "rule": rule,
              "chosen": chosen, "curve": rows, "removal": removal, "recall_by_opacity": by_opacity,
              "timing": timings,
              "detect_seconds_total": seconds}
    print(json.dumps({k: result[k] for k in ("feature", "chosen", "removal", "recall_by_opacity")}))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
