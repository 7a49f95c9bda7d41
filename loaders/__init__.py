"""Bytes to pixels: image folders -> WebDataset shards -> uint8 crops on the training device."""

from loaders.batch import Batch
from loaders.build import build_loader
from loaders.convert import ConvertReport, convert_to_shards
from loaders.manifest import ShardInfo, ShardSet, load_shard_set

__all__ = ["Batch", "build_loader", "ConvertReport", "convert_to_shards", "ShardInfo", "ShardSet", "load_shard_set"]
