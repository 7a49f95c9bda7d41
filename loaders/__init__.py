"""Bytes to pixels: image folders -> WebDataset shards -> uint8 crops on the training device."""

from loaders.batch import Batch
from loaders.manifest import ShardInfo, ShardSet, load_shard_set

__all__ = ["Batch", "ShardInfo", "ShardSet", "load_shard_set"]
