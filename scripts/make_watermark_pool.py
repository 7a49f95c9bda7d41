"""Build the bundled default watermark pool in ecomaug/assets/watermarks/ (run once; output is committed).

Every mark is invented: shop-like names that belong to no real shop, drawn with the DejaVu fonts
(Bitstream Vera / DejaVu licence, free to use and redistribute; only rendered pixels are shipped),
optionally next to public-domain clip art from openclipart (Debian package ``openclipart-png``).
No brand names or trademarks. Writes PROVENANCE.md next to the marks.

    python scripts/make_watermark_pool.py [--fonts /usr/share/fonts/truetype/dejavu]
        [--clipart /usr/share/openclipart/png] [--out ecomaug/assets/watermarks]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ecomaug.marks import render_text_mark  # the one text-mark drawer

# (file stem, text, font file, colour, style); style: plain | outline | badge | stamp
TEXT_MARKS = [
    ("text-sunny-mart", "Sunny Mart", "DejaVuSans-Bold.ttf", (255, 255, 255), "plain"),
    ("text-kumo-shop", "kumo shop", "DejaVuSerif-Italic.ttf", (20, 20, 20), "plain"),
    ("text-free-shipping", "FREE SHIPPING", "DejaVuSansCondensed-Bold.ttf", (220, 30, 30), "plain"),
    ("text-sale", "SALE 30% OFF", "DejaVuSans-Bold.ttf", (255, 255, 255), "plain"),
    ("text-lumen-store", "\u00a9 Lumen Store", "DejaVuSerif.ttf", (255, 255, 255), "plain"),
    ("text-url", "shop.example.com", "DejaVuSansMono.ttf", (30, 30, 30), "plain"),
    ("text-new-arrival", "NEW ARRIVAL", "DejaVuSansCondensed.ttf", (255, 255, 255), "plain"),
    ("text-handle", "@vintage_finds", "DejaVuSans-Oblique.ttf", (60, 60, 60), "plain"),
    ("text-hana-outlet", "Hana Outlet", "DejaVuSerifCondensed-Bold.ttf", (255, 255, 255), "plain"),
    ("text-sample", "SAMPLE", "DejaVuSans-Bold.ttf", (128, 128, 128), "plain"),
    ("text-tokyo-select", "Tokyo Select", "DejaVuSerif-Bold.ttf", (255, 255, 255), "outline"),
    ("text-maple", "Maple & Co.", "DejaVuSans-Bold.ttf", (250, 220, 80), "outline"),
    ("text-original", "ORIGINAL", "DejaVuSansMono-Bold.ttf", (255, 255, 255), "outline"),
    ("badge-best-deal", "BEST DEAL", "DejaVuSans-Bold.ttf", (210, 40, 40), "badge"),
    ("badge-okazu-goods", "Okazu Goods", "DejaVuSerif-Bold.ttf", (30, 90, 160), "badge"),
    ("badge-outlet", "OUTLET", "DejaVuSansCondensed-Bold.ttf", (20, 20, 20), "badge"),
    ("stamp-genuine", "GENUINE", "DejaVuSans-Bold.ttf", (200, 30, 30), "stamp"),
]

# (file stem, clip art path relative to the openclipart png folder, caption or None, caption font)
CLIPART_MARKS = [
    ("logo-box", "containers/closed_box_juliane_krug_.png", "box & co", "DejaVuSans-Bold.ttf"),
    ("logo-sakura", "decorations/sakura_01.png", "sakura select", "DejaVuSerif-Italic.ttf"),
    ("logo-triskell", "decorations/celtic_triskell_01.png", "Triskel Crafts", "DejaVuSerif-Bold.ttf"),
    ("logo-leaf", "plants/leaf_01.png", None, None),
    ("logo-star", "shapes/star_double_tom_webb_.png", "Star Goods", "DejaVuSansCondensed-Bold.ttf"),
    ("logo-heart", "shapes/heart_jon_phillips_01.png", "Love Shop", "DejaVuSans-Bold.ttf"),
]

SIZE = 64  # font size in pixels: the atlas cell is 128 x 256, marks are shrunk to fit


def text_image(text: str, font: ImageFont.FreeTypeFont, colour, stroke: int = 0, stroke_colour=(30, 30, 30)):
    return render_text_mark(text, font=font, fill=colour, stroke=stroke, outline=stroke_colour, pad=1)


def styled_text(text: str, font: ImageFont.FreeTypeFont, colour, style: str) -> Image.Image:
    if style == "plain":
        return text_image(text, font, colour)
    if style == "outline":
        return text_image(text, font, colour, stroke=3)
    words = text_image(text, font, (255, 255, 255))
    pad = SIZE // 3
    if style == "badge":
        image = Image.new("RGBA", (words.width + 2 * pad, words.height + 2 * pad), (0, 0, 0, 0))
        ImageDraw.Draw(image).rounded_rectangle((0, 0, image.width - 1, image.height - 1), radius=pad,
                                                fill=colour + (255,))
        image.alpha_composite(words, (pad, pad))
        return image
    if style == "stamp":  # a ring with the word across: a rubber-stamp look in one colour
        words = text_image(text, font, colour)
        side = words.width + 2 * pad
        image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        draw = ImageDraw.Draw(image)
        draw.ellipse((2, 2, side - 3, side - 3), outline=colour + (255,), width=SIZE // 6)
        draw.ellipse((SIZE // 3, SIZE // 3, side - SIZE // 3, side - SIZE // 3), outline=colour + (255,), width=4)
        image.alpha_composite(words, (pad, (side - words.height) // 2))
        return image
    raise ValueError(f"unknown style {style!r}")


def clipart_mark(path: Path, caption: str | None, font: ImageFont.FreeTypeFont | None) -> Image.Image:
    art = Image.open(path).convert("RGBA")
    art = art.crop(art.getbbox())
    art.thumbnail((3 * SIZE, 3 * SIZE // 2 if caption else 3 * SIZE), Image.Resampling.LANCZOS)
    if caption is None:
        return art
    words = text_image(caption, font, (40, 40, 40), stroke=2, stroke_colour=(255, 255, 255))
    image = Image.new("RGBA", (art.width + SIZE // 4 + words.width, max(art.height, words.height)), (0, 0, 0, 0))
    image.alpha_composite(art, (0, (image.height - art.height) // 2))
    image.alpha_composite(words, (art.width + SIZE // 4, (image.height - words.height) // 2))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fonts", type=Path, default=Path("/usr/share/fonts/truetype/dejavu"))
    parser.add_argument("--clipart", type=Path, default=Path("/usr/share/openclipart/png"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "ecomaug/assets/watermarks")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for stem, text, font_file, colour, style in TEXT_MARKS:
        image = styled_text(text, ImageFont.truetype(str(args.fonts / font_file), SIZE), colour, style)
        image.thumbnail((256, 128), Image.Resampling.LANCZOS)
        image.save(args.out / f"{stem}.png", optimize=True)
        rows.append(f"| {stem}.png | invented text \"{text}\" ({style}) | {font_file} (DejaVu fonts licence) |")
    for stem, relative, caption, font_file in CLIPART_MARKS:
        font = ImageFont.truetype(str(args.fonts / font_file), SIZE // 2) if font_file else None
        image = clipart_mark(args.clipart / relative, caption, font)
        image.thumbnail((256, 128), Image.Resampling.LANCZOS)
        image.save(args.out / f"{stem}.png", optimize=True)
        words = f" + invented caption \"{caption}\" ({font_file}, DejaVu fonts licence)" if caption else ""
        rows.append(f"| {stem}.png | openclipart `{relative}` (public domain){words} | openclipart-png |")
    (args.out / "PROVENANCE.md").write_text(PROVENANCE.format(rows="\n".join(rows)))
    print(f"wrote {len(rows)} marks to {args.out}")


PROVENANCE = """# Default watermark pool: provenance

Generated by `scripts/make_watermark_pool.py`; rerun it to rebuild. Every name below is invented for
this pool and belongs to no real shop; no brand names, logos or trademarks are included.

- Text is rendered with the DejaVu fonts (https://dejavu-fonts.github.io/, Bitstream Vera licence with
  DejaVu changes in the public domain: free to use, modify and redistribute). Only rendered pixels
  are shipped, no font files.
- Clip art comes from the Open Clip Art Library as packaged by Debian (`openclipart-png`), dedicated to
  the public domain (Creative Commons Public Domain Dedication).
- The pool itself (these PNGs) is released under the project's licence (Apache-2.0).

| file | content | source |
|---|---|---|
{rows}
"""


if __name__ == "__main__":
    main()
