"""Write the README's user-style mark pool (docs/examples/my_marks/): three marks as a team would bring them.

* ``ring-logo.png``: a logo with an alpha channel (taken as it is);
* ``blue-badge.jpg``: a JPEG on a white background, no alpha (its background is keyed out);
* ``text-kedai-rina.png``: a text mark, the shop's name drawn with :func:`ecomaug.marks.render_text_mark`.

All three are invented here (no real shop or brand). Run once; the output is committed.

    python scripts/make_example_pool.py [--out docs/examples/my_marks]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from ecomaug.marks import render_text_mark


def write_example_pool(out: Path) -> list[Path]:
    """Write the three marks into ``out`` and return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    ring = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    draw = ImageDraw.Draw(ring)
    draw.ellipse((8, 8, 152, 152), outline=(200, 40, 60, 255), width=16)
    draw.polygon([(80, 36), (120, 118), (40, 118)], fill=(200, 40, 60, 255))
    badge = Image.new("RGB", (220, 90), (255, 255, 255))
    draw = ImageDraw.Draw(badge)
    draw.rounded_rectangle((10, 10, 210, 80), radius=18, fill=(30, 80, 190))
    draw.text((110, 45), "BEST BUY", anchor="mm", fill=(255, 255, 255), font_size=34)
    text = render_text_mark("Kedai Rina", height=72, fill=(250, 250, 250), stroke=3, outline=(30, 30, 30))
    paths = [out / "ring-logo.png", out / "blue-badge.jpg", out / "text-kedai-rina.png"]
    ring.save(paths[0])
    badge.save(paths[1], quality=92)
    text.save(paths[2])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "docs/examples/my_marks")
    args = parser.parse_args()
    for path in write_example_pool(args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
