"""The bundled sample as training and held-out shards, for ``python train.py`` without ``--data``."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from ecomaug.distributed import barrier, get_rank

logger = logging.getLogger(__name__)


def is_held_out(item_id: str) -> bool:
    """The sample's held-out items: every fourth (``item003``, ``item007``, ...)."""
    digits = "".join(character for character in item_id if character.isdigit())
    return bool(digits) and int(digits) % 4 == 3


def sample_shards(out_dir: Path, *, progress: bool) -> tuple[Path, Path]:
    """The bundled sample as shards: ``OUT/shards`` to train on, ``OUT/val-shards`` held out.

    One item in four (by its number) is held out, with all of its photos, so the closing
    recall is measured on items the run never trained on. Converted once, by rank 0.
    """
    from ecomaug.paths import SAMPLE_MANIFEST

    shards, val_shards = out_dir / "shards", out_dir / "val-shards"
    if get_rank() == 0 and not all((path / "manifest.json").is_file() for path in (shards, val_shards)):
        from loaders.convert import convert_to_shards

        with open(SAMPLE_MANIFEST, newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        out_dir.mkdir(parents=True, exist_ok=True)
        split = {"train": [r for r in rows if not is_held_out(r["item_id"])],
                 "val": [r for r in rows if is_held_out(r["item_id"])]}
        logger.info("converting the bundled sample %s into shards: %d photos to train on (%s), %d of held-out "
                    "items (%s)", SAMPLE_MANIFEST, len(split["train"]), shards, len(split["val"]), val_shards)
        for name, target in (("train", shards), ("val", val_shards)):
            listing = out_dir / f"sample-{name}.csv"
            with listing.open("w", newline="", encoding="utf-8") as stream:
                writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows({**row, "path": str(Path(SAMPLE_MANIFEST).parent / row["path"])}
                                 for row in split[name])
            convert_to_shards(listing, target, shard_size=64, workers=1, progress=progress)
    barrier()
    return shards, val_shards
