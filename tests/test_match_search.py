"""Neighbour search: the faiss index paths agree with exact search; the size rule; reuse."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from ecomaug.matching.search import (choose_method, exact_search, fingerprint, ivf_lists,
                                     search)


def _clustered(count: int, dim: int, seed: int) -> torch.Tensor:
    """Unit vectors in tight clusters of 4, like several listings of one item."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(count // 4, dim, generator=generator)
    points = centres.repeat_interleave(4, dim=0) + 0.3 * torch.randn(count, dim, generator=generator)
    return torch.nn.functional.normalize(points, dim=1)


def test_exact_search_matches_a_full_matrix():
    query, database = _clustered(64, 16, 0), _clustered(200, 16, 1)
    scores, indices = exact_search(query, database, k=5, query_chunk=7, gallery_chunk=33)
    full = query @ database.T
    reference = torch.topk(full, 5, dim=1)
    np.testing.assert_allclose(scores, reference.values.numpy(), rtol=1e-5, atol=1e-6)
    assert (indices == reference.indices.numpy()).mean() > 0.99  # ties may swap


@pytest.mark.parametrize("method", ["ivf", "hnsw"])
def test_index_agrees_with_exact_search(method, tmp_path):
    pytest.importorskip("faiss")
    database = _clustered(4000, 32, 0)
    query = torch.nn.functional.normalize(database[:500] + 0.05 * torch.randn(
        500, 32, generator=torch.Generator().manual_seed(3)), dim=1)
    result = search(query, database, k=10, method=method, index_path=tmp_path / "db.faiss",
                    database_id=fingerprint([str(i) for i in range(4000)], database))
    _, truth = exact_search(query, database, k=10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(result.indices, truth)])
    assert recall >= 0.95 and result.info["recall_vs_exact"] >= 0.95
    assert result.method == method and not result.info["reused"]
    assert (tmp_path / "db.faiss").is_file() and (tmp_path / "db.json").is_file()
    again = search(query, database, k=10, method=method, index_path=tmp_path / "db.faiss",
                   database_id=fingerprint([str(i) for i in range(4000)], database))
    assert again.info["reused"] and (again.indices == result.indices).all()
    other = search(query, database, k=10, method=method, index_path=tmp_path / "db.faiss",
                   database_id="another database")
    assert not other.info["reused"]


def test_the_size_rule():
    assert choose_method(1000) == "exact"
    assert choose_method(10**6) == "ivf"
    assert choose_method(10**6, exact_limit=2 * 10**6) == "exact"
    assert choose_method(10, method="hnsw") == "hnsw"
    assert ivf_lists(10**6) == 1024 and ivf_lists(10) == 16 and ivf_lists(10**12) == 65536
    with pytest.raises(ValueError, match="search method must be one of"):
        choose_method(10, method="annoy")


def test_an_index_without_faiss_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    database = _clustered(40, 8, 0)
    with pytest.raises(ImportError, match=r"pip install 'ecomaug\[faiss\]'"):
        search(database, database, k=3, method="ivf")
    assert search(database, database, k=3, method="auto").method == "exact"
