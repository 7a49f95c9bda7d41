"""Where the benchmark's shards come from when the user passes none.

``ecomaug bench`` must work out of the box: it converts the bundled sample into shards once and
keeps them in a cache folder, or, when the sample is not installed, generates synthetic
product-like images first. Conversion goes through ``loaders.convert`` (the real shard writer);
only when that module is absent does a minimal writer here pack the JPEGs as they are, in the
same shard format, so the rest of the benchmark still has something to read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from ecomaug.paths import SAMPLE_MANIFEST

SYNTHETIC_IMAGES = 256
SYNTHETIC_SIZE = 320


def cache_root() -> Path:
    """``$ECOMAUG_CACHE`` or ``$XDG_CACHE_HOME/ecomaug`` (default ``~/.cache/ecomaug``)."""
    if os.environ.get("ECOMAUG_CACHE"):
        return Path(os.environ["ECOMAUG_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ecomaug"


def default_shards(*, cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Shards of the bundled sample (or of synthetic images), made once and cached.

    Args:
        cache_dir: folder that keeps the converted shards; default :func:`cache_root` / ``bench``.
        seed: seed of the synthetic images (used only when the sample is not installed).

    Returns:
        A directory that :func:`loaders.load_shard_set` reads.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "bench"
    use_sample = SAMPLE_MANIFEST.is_file()
    writer = "convert" if _convert_function() is not None else "pack"
    identity = hashlib.sha1(f"{writer}|{seed}".encode())
    if use_sample:
        identity.update(SAMPLE_MANIFEST.read_bytes())
    target = root / f"{'sample' if use_sample else 'synthetic'}-{writer}-{identity.hexdigest()[:12]}"
    if (target / "manifest.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".making-") as scratch:
        manifest = SAMPLE_MANIFEST if use_sample else write_synthetic_images(Path(scratch) / "images", seed=seed)
        staging = Path(scratch) / "shards"
        staging.mkdir()
        convert = _convert_function()
        if convert is not None:
            convert(manifest, staging, shard_size=64, workers=1, progress=False)
        else:
            pack_jpegs(manifest, staging, shard_size=64)
        # A rename, so a second run never sees a half-written cache entry.
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "manifest.json").is_file():
                raise
    return target


def _convert_function():
    try:
        from loaders.convert import convert_to_shards
    except ImportError:
        return None
    return convert_to_shards


def write_synthetic_images(folder: Path, *, seed: int = 0, count: int = SYNTHETIC_IMAGES,
                           size: int = SYNTHETIC_SIZE) -> Path:
    """Write ``count`` product-like JPEGs (a shape on a gradient) and an ``items.csv`` for them.

    Returns:
        The path of ``items.csv`` (columns ``path,item_id,region,shop,title``).
    """
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        top = tuple(rng.randrange(256) for _ in range(3))
        bottom = tuple(rng.randrange(256) for _ in range(3))
        image = Image.new("RGB", (size, size))
        draw = ImageDraw.Draw(image)
        for y in range(size):
            t = y / (size - 1)
            draw.line([(0, y), (size, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
        x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
        box = [x0, y0, x0 + rng.randrange(size // 4, size // 2), y0 + rng.randrange(size // 4, size // 2)]
        color = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if index % 2 else draw.rectangle)(box, fill=color)
        name = f"synthetic{index:05d}.jpg"
        image.save(folder / name, quality=90)
        rows.append({"path": name, "item_id": f"item{index // 4:05d}", "region": "XX",
                     "shop": f"shop{index % 7}", "title": "synthetic product"})
    manifest = folder / "items.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def pack_jpegs(manifest: Path, out: Path, *, shard_size: int = 64) -> None:
    """Pack the JPEGs an ``items.csv`` lists into ``ecomaug-shards`` tars, bytes unchanged.

    The fallback for when ``loaders.convert`` is not installed: no resizing, no re-encoding,
    no duplicate check; enough for a throughput benchmark.
    """
    from PIL import Image

    from loaders.manifest import FORMAT_NAME, FORMAT_VERSION, write_json_atomic

    with open(manifest, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    if not rows:
        raise ValueError(f"{manifest}: lists no images")
    shards = []
    for start in range(0, len(rows), shard_size):
        tar_name = f"shard-{len(shards):06d}.tar"
        with tarfile.open(out / tar_name, "w") as tar:
            for row in rows[start:start + shard_size]:
                source = manifest.parent / row["path"]
                data = source.read_bytes()
                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
                key = hashlib.sha1(row["path"].encode()).hexdigest()[:20]
                meta = {"key": key, "source": row["path"], "width": width, "height": height,
                        **{k: v for k, v in row.items() if k != "path"}}
                for suffix, payload in (("jpg", data), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        index_name = _write_dali_index(out / tar_name)
        shards.append({"tar": tar_name, "index": index_name, "count": len(rows[start:start + shard_size]),
                       "bytes": (out / tar_name).stat().st_size, "groups": {}})
    write_json_atomic(out / "manifest.json", {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "ecomaug_version": _version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "input": str(manifest),
        "options": {"writer": "bench.shards.pack_jpegs"},
        "job": None, "shards": shards, "groups": {},
        "totals": {"inputs": len(rows), "written": len(rows), "skipped": 0,
                   "bytes": sum(s["bytes"] for s in shards), "skipped_by_reason": {}}})


def _write_dali_index(tar_path: Path) -> str | None:
    try:
        from wds2idx import IndexCreator
    except ImportError:  # DALI not installed: the torch loader does not need an index
        return None
    index_path = tar_path.with_suffix(".idx")
    with IndexCreator(str(tar_path), str(index_path), verbose=False) as creator:
        creator.create_index()
    return index_path.name


def _version() -> str:
    from ecomaug import __version__

    return __version__

