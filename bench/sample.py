"""The bundled sample as shards, converted once into a cache folder: the benchmarks' default input."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from ecomaug.paths import SAMPLE_MANIFEST


def cache_root() -> Path:
    """``$ECOMAUG_CACHE`` or ``$XDG_CACHE_HOME/ecomaug`` (default ``~/.cache/ecomaug``)."""
    if os.environ.get("ECOMAUG_CACHE"):
        return Path(os.environ["ECOMAUG_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ecomaug"


def sample_shards(*, cache_dir: str | os.PathLike | None = None) -> Path:
    """Shards of the bundled sample (shards of 64 samples), made once and cached.

    Args:
        cache_dir: folder that keeps the converted shards; default :func:`cache_root` / ``bench``.

    Returns:
        A directory that :func:`loaders.load_shard_set` reads.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "bench"
    identity = hashlib.sha1(SAMPLE_MANIFEST.read_bytes()).hexdigest()[:12]
    target = root / f"sample-{identity}"
    if (target / "manifest.json").is_file():
        return target
    from loaders.convert import convert_to_shards

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".making-") as scratch:
        staging = Path(scratch) / "shards"
        staging.mkdir()
        convert_to_shards(SAMPLE_MANIFEST, staging, shard_size=64, workers=1, progress=False)
        # A rename, so a second run never sees a half-written cache entry.
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "manifest.json").is_file():
                raise
    return target
