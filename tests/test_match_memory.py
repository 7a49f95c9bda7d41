"""Matching a large catalogue without a second copy of it: exact search a block at a time, the
index added in chunks, its size counted as written; each gives what the one-piece way gives."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from ecomaug.matching.index import IndexPlan, build_within_budget, serialized_bytes
from ecomaug.matching.search import exact_search

faiss = pytest.importorskip("faiss")
# the package exports a function named search: the modules themselves, to patch their constants
index_module = importlib.import_module("ecomaug.matching.index")
search_module = importlib.import_module("ecomaug.matching.search")


def _clustered(count: int, dim: int, seed: int) -> torch.Tensor:
    """Unit vectors in tight clusters of 4, like several listings of one item."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(count // 4, dim, generator=generator)
    points = centres.repeat_interleave(4, dim=0) + 0.3 * torch.randn(count, dim, generator=generator)
    return torch.nn.functional.normalize(points, dim=1)


def test_exact_search_in_blocks_matches_a_full_matrix(monkeypatch):
    query, database = _clustered(40, 16, 0), _clustered(1000, 16, 1)
    monkeypatch.setattr(search_module, "EXACT_BLOCK_BYTES", 4 * 16 * 100)  # 100 rows a block
    scores, indices = exact_search(query, database, k=7, query_chunk=9, gallery_chunk=30)
    reference = torch.topk(query @ database.T, 7, dim=1)
    np.testing.assert_allclose(scores, reference.values.numpy(), rtol=1e-5, atol=1e-6)
    assert (indices == reference.indices.numpy()).mean() > 0.99  # ties may swap
    assert indices.max() > 900  # the last block was searched


def test_exact_search_in_blocks_pads_a_small_database(monkeypatch):
    query, database = _clustered(8, 16, 0), _clustered(12, 16, 1)
    monkeypatch.setattr(search_module, "EXACT_BLOCK_BYTES", 4 * 16 * 5)
    scores, indices = exact_search(query, database, k=15, gallery_chunk=5)
    assert sorted(indices[0, :12].tolist()) == list(range(12))
    assert (indices[:, 12:] == -1).all() and np.isneginf(scores[:, 12:]).all()


def test_chunked_add_builds_the_index_one_add_builds(monkeypatch):
    vectors = _clustered(2560, 16, 2).numpy()
    plan = IndexPlan("IVF8,PQ4x8", "IVF-PQ", 0, 8, 4)
    whole, _ = build_within_budget(vectors, [plan], 2**30, seed=0)
    monkeypatch.setattr(index_module, "ADD_CHUNK", 300)
    chunked, _ = build_within_budget(vectors, [plan], 2**30, seed=0)
    assert chunked.ntotal == whole.ntotal == 2560
    assert bytes(faiss.serialize_index(chunked)) == bytes(faiss.serialize_index(whole))


def test_serialized_bytes_is_the_size_written(tmp_path):
    vectors = _clustered(2000, 16, 3).numpy()
    index = faiss.index_factory(16, "IVF8,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    assert serialized_bytes(index) == (tmp_path / "index.faiss").stat().st_size == faiss.serialize_index(index).size
