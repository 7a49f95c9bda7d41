"""Shared fixtures: the device(s) to test on, the bundled sample and its shards."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from ecomaug.paths import SAMPLE_DIR, SAMPLE_MANIFEST

# shard checks are remembered on disk (loaders.shard_check): keep the tests' out of ~/.cache
os.environ["ECOMAUG_CACHE_DIR"] = tempfile.mkdtemp(prefix="ecomaug-test-cache-")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every device test runs on CPU, and on CUDA too where one is present."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The bundled sample images (``items.csv`` lists them with item_id/region/shop/title)."""
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def sample_manifest() -> Path:
    return SAMPLE_MANIFEST


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    """The bundled sample converted once per test session into shards of 64 samples."""
    from loaders.convert import convert_to_shards

    out = tmp_path_factory.mktemp("sample_shards")
    convert_to_shards(SAMPLE_MANIFEST, out, shard_size=64, workers=1, progress=False)
    return out
