"""Where the bundled assets live (sample images, default watermark pool)."""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
SAMPLE_DIR = ASSETS_DIR / "sample"
SAMPLE_MANIFEST = SAMPLE_DIR / "items.csv"
WATERMARK_DIR = ASSETS_DIR / "watermarks"
