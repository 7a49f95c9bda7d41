"""Images -> WebDataset shards: streaming, parallel, resumable and crash-safe.

:func:`convert_to_shards` lists the inputs (a folder, or a CSV/JSONL/Parquet manifest of paths or
of URLs, which :mod:`loaders.convert.fetch` fetches), optionally
samples them evenly per group, holds out a validation split by item and keeps this job's share,
cleans every image in worker processes (:mod:`loaders.convert.hygiene`) and writes
``{prefix}-{NNNNNN}.tar`` shards (byte for byte what webdataset's ``TarWriter`` writes) plus a
DALI index per shard, then ``manifest.json`` and ``skipped.jsonl`` (format:
``docs/architecture.md``, "Shard format").

Crash safety: a shard is written under a hidden temporary name and renamed when complete; then
one line is appended to a per-job journal (``.convert-journal*.jsonl``) saying how many inputs
(a prefix of this job's deterministic input order) are settled, which shard they went to, what
was skipped and the digests used to find duplicates. Running the same command again after a
crash deletes any shard the journal does not know, and continues after the last settled input,
so every input ends up exactly once, written or skipped. The journal is removed once the
manifest is written.
"""

from loaders.lazy import lazy_exports

# Imported on first use: the loaders' shard check needs only jpeg_structure, not the pool.
_LAZY_EXPORTS = {"convert_to_shards": "loaders.convert.run", "VAL_DIR": "loaders.convert.run",
                 "ConvertReport": "loaders.convert.outputs", "DiskFullError": "loaders.convert.out_dir",
                 "OutDirLocked": "loaders.convert.out_dir", "FetchOptions": "loaders.convert.fetch"}
__all__ = list(_LAZY_EXPORTS)

__getattr__ = lazy_exports(__name__, _LAZY_EXPORTS)
