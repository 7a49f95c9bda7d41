"""Bytes to pixels: image folders -> WebDataset shards -> uint8 crops on the training device."""

from loaders.lazy import lazy_exports

# Public names, imported on first use: ``ecomaug shard`` (loaders.convert) must not pay for
# importing torch in its parent process, which never needs it.
_LAZY_EXPORTS = {"Batch": "loaders.batch", "build_loader": "loaders.build",
                 "choose_backend": "loaders.build", "endless_batches": "loaders.build",
                 "EpochPlan": "loaders.sharding", "epoch_plan": "loaders.sharding",
                 "LoaderOptions": "loaders.options",
                 "ConvertReport": "loaders.convert", "convert_to_shards": "loaders.convert",
                 "ShardInfo": "loaders.manifest", "ShardSet": "loaders.manifest",
                 "load_shard_set": "loaders.manifest"}
__all__ = list(_LAZY_EXPORTS)

__getattr__ = lazy_exports(__name__, _LAZY_EXPORTS)
