"""Shared fixtures: the device(s) to test on, the bundled sample and its shards."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from ecomaug.paths import SAMPLE_DIR, SAMPLE_MANIFEST

# shard checks are remembered on disk (loaders.shard_check): keep the tests' out of ~/.cache
# (one folder per pytest process, removed when it exits: runs must not fill the disk of a shared machine)
os.environ["ECOMAUG_CACHE_DIR"] = tempfile.mkdtemp(prefix="ecomaug-test-cache-")
atexit.register(shutil.rmtree, os.environ["ECOMAUG_CACHE_DIR"], ignore_errors=True)

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


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 (moto's server) for the whole session: its endpoint URL; skipped without moto/s3fs."""
    pytest.importorskip("s3fs")
    pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_client(s3_server, monkeypatch):
    """A boto3 client of the local S3, with the environment pointing every S3 client (s3fs too) at it."""
    import boto3
    import fsspec

    for name, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # s3fs keeps instances with their endpoint
    yield boto3.client("s3", endpoint_url=s3_server)
    fsspec.get_filesystem_class("s3").clear_instance_cache()
