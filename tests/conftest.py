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

# Under pytest-xdist every worker would otherwise run torch's default thread pool (one thread per
# core), so 2 workers on 2 cores run 4 OpenMP threads, whose spinning barriers slow a busy machine
# by up to ~10x (measured: a MoCo step 1.4 s with 1 thread, 17 s with 2 under load). One thread per
# worker, inherited by the subprocesses the tests start.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The CUDA cases carry the ``cuda`` marker: ``pytest -m cuda`` runs every one of them on a GPU machine.
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])


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
