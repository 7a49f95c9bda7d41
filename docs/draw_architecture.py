"""Draw ``docs/architecture.svg``: the folders as the steps of one sample's path.

    python docs/draw_architecture.py          # rewrites docs/architecture.svg

Plain SVG written by hand (no plotting library), so the picture is the same on every machine and
renders on GitHub. The five files of the one-image trace in ``docs/architecture.md`` carry their
number; edit ``COLUMNS`` when a file moves, then run this again.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

OUT = Path(__file__).resolve().parent / "architecture.svg"

# Each step: its arrow, the folder it lives in, its lines, and what it hands to the next step.
# A line is (text, kind): "folder", "file", a trace number "1".."5", or "note".
COLUMNS: list[dict] = [
    {"step": "images → shards", "layer": "bytes", "lines": [
        ("loaders/convert/", "folder"),
        ("inputs · settings · plan", "file"), ("hygiene · jpeg_structure", "file"), ("workers · shard_writer", "file"),
        ("journal · out_dir", "file"), ("outputs · run", "file"),
        ("loaders/", "folder"), ("dali_index · atomic", "file"),
        ("ecomaug/dewatermark/", "folder"), ("the conversion hook", "note")],
     "command": "ecomaug shard", "bench": "convert", "hands": "tar + .idx + manifest.json"},
    {"step": "shards → pixels", "layer": "pixels", "lines": [
        ("loaders/", "folder"),
        ("build (choose_backend)", "file"), ("options · manifest", "file"),
        ("sharding (epoch_plan)", "file"), ("shard_reader · remote", "file"),
        ("torch_backend.py", "1"), ("  | dali_backend.py", "file"),
        ("views · crops · batch", "file")],
     "command": "", "bench": "loaders · pipeline", "hands": "Batch: uint8 N×3×S×S"},
    {"step": "pixels → views", "layer": "views", "lines": [
        ("ecomaug/", "folder"),
        ("recipes.py", "4"), ("recipe_config", "file"), ("recipe_defaults", "file"),
        ("marks · watermark_pool", "file"),
        ("ecomaug/augmentation/", "folder"),
        ("perspective · colour", "file"), ("mosaic · watermark", "file"),
        ("mocov2 · custom · sampling", "file")],
     "command": "ecomaug preview", "bench": "augment", "hands": "float views in [0, 1]"},
    {"step": "views → weights", "layer": "weights", "lines": [
        ("train.py → ecomaug/engine/", "folder"),
        ("setup", "file"), ("trainer.py", "2"), ("step.py", "3"),
        ("monitor · metrics · rundir", "file"),
        ("ecomaug/", "folder"),
        ("normalise · objective", "file"), ("moco.py", "5"), ("  | siamese.py", "file"),
        ("distributed · checkpoint", "file"), ("export", "file")],
     "command": "ecomaug train · export", "bench": "moco-reference · gpu", "hands": "RUN/export"},
    {"step": "weights → matches", "layer": "matches", "lines": [
        ("ecomaug/evaluation/", "folder"),
        ("embed · models · sources", "file"), ("embeddings · retrieval", "file"),
        ("chunked_search · regions", "file"), ("queries · disturbances", "file"),
        ("baselines · report", "file"),
        ("ecomaug/matching/", "folder"),
        ("catalogue · search · rerank", "file"), ("calibrate · match · report", "file")],
     "command": "ecomaug embed · eval · match", "bench": "robustness · match", "hands": ""},
]

WIDTH, GAP, MARGIN = 240, 44, 16
TOP, LINE = 66, 19
BOX_HEIGHT = 30 + LINE * max(len(spec["lines"]) for spec in COLUMNS) + 12
COLOURS = {"box": "#f6f8fa", "edge": "#57606a", "folder": "#0b5394", "file": "#24292f", "note": "#57606a",
           "trace": "#b35900", "badge": "#e69138", "bench": "#38761d", "command": "#6f42c1"}
FONT = "font-family:DejaVu Sans,Helvetica,Arial,sans-serif"
MONO = "font-family:DejaVu Sans Mono,Menlo,Consolas,monospace"


def text(x: float, y: float, content: str, *, size: int = 12, colour: str = "#24292f", weight: str = "normal",
         anchor: str = "start", mono: bool = False) -> str:
    style = f"{MONO if mono else FONT};font-size:{size}px;font-weight:{weight}"
    return (f'<text x="{x:.0f}" y="{y:.0f}" fill="{colour}" text-anchor="{anchor}" style="{style}">'
            f"{escape(content)}</text>")


def column(index: int, spec: dict) -> list[str]:
    """One step's box: its arrow as the title, its files, and its command and bench stage below."""
    left = MARGIN + index * (WIDTH + GAP)
    centre = left + WIDTH / 2
    parts = [f'<rect x="{left}" y="{TOP}" width="{WIDTH}" height="{BOX_HEIGHT}" rx="8" fill="{COLOURS["box"]}" '
             f'stroke="{COLOURS["edge"]}" stroke-width="1.2"/>',
             text(centre, TOP - 26, spec["step"], size=15, weight="bold", anchor="middle"),
             text(centre, TOP - 9, spec["layer"], size=11, colour=COLOURS["note"], anchor="middle")]
    y = TOP + 22
    for content, kind in spec["lines"]:
        if kind == "folder":
            y += 4 if y > TOP + 22 else 0
            parts.append(text(left + 10, y, content, size=12, colour=COLOURS["folder"], weight="bold", mono=True))
        elif kind.isdigit():
            parts.append(f'<circle cx="{left + 21}" cy="{y - 4}" r="8" fill="{COLOURS["badge"]}"/>')
            parts.append(text(left + 21, y, kind, size=11, colour="#ffffff", weight="bold", anchor="middle"))
            parts.append(text(left + 34, y, content, size=12, colour=COLOURS["trace"], weight="bold", mono=True))
        else:
            parts.append(text(left + 18, y, content, size=12 if kind == "file" else 11,
                              colour=COLOURS[kind], mono=kind == "file"))
        y += LINE
    bottom = TOP + BOX_HEIGHT
    if spec["command"]:
        parts.append(text(centre, bottom + 22, spec["command"], size=12, colour=COLOURS["command"],
                          anchor="middle", mono=True))
    parts.append(text(centre, bottom + 58, f"python -m bench {spec['bench']}", size=11,
                      colour=COLOURS["bench"], anchor="middle", mono=True))
    if spec["hands"]:
        arrow_y = TOP + BOX_HEIGHT / 2
        x0, x1 = left + WIDTH + 2, left + WIDTH + GAP - 3
        parts.append(f'<line x1="{x0}" y1="{arrow_y}" x2="{x1}" y2="{arrow_y}" stroke="{COLOURS["edge"]}" '
                     f'stroke-width="2" marker-end="url(#head)"/>')
        label_x = (x0 + x1) / 2 + 4
        parts.append(f'<text x="{label_x:.0f}" y="{arrow_y - 8:.0f}" fill="{COLOURS["note"]}" '
                     f'text-anchor="start" transform="rotate(-90 {label_x:.0f} {arrow_y - 8:.0f})" '
                     f'style="{FONT};font-size:10px">{escape(spec["hands"])}</text>')
    return parts


def draw() -> str:
    """The whole SVG document."""
    width = 2 * MARGIN + len(COLUMNS) * WIDTH + (len(COLUMNS) - 1) * GAP
    bottom = TOP + BOX_HEIGHT
    height = bottom + 100
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">',
             '<defs><marker id="head" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
             f'<path d="M0,0 L8,4 L0,8 z" fill="{COLOURS["edge"]}"/></marker></defs>',
             f'<rect width="{width}" height="{height}" fill="#ffffff"/>']
    for index, spec in enumerate(COLUMNS):
        parts += column(index, spec)
    parts.append(text(MARGIN, bottom + 86, "1-5: the one-image trace, tar member to loss (docs/architecture.md).  "
                      "Purple: the step's click command (ecomaug/commands/, one module each).  "
                      "Green: its stage of the bench harness (bench/harness.py).", size=11, colour=COLOURS["note"]))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    OUT.write_text(draw(), encoding="utf-8")
    print(f"wrote {OUT}")
