"""Recall@k and mAP against hand-checked tiny examples, and the chunked search against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ecomaug.evaluation.retrieval import retrieval_metrics, retrieve, summarize

# Gallery: g0=(1,0) item A, g1=(0,1) item B, g2=(1,1)/sqrt2 item A, g3=(-1,0) item C.
GALLERY = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]
GALLERY_ITEMS = ["A", "B", "A", "C"]
# Queries (cosines worked out by hand, |q| = 1.0198 for q0/q1, 1.005 for q2):
# q0=(1,0.2) item A: g0 .981, g2 .832, g1 .196, g3 -.981 -> A at ranks 1, 2:
#     first hit 1, AP = (1/1 + 2/2)/2 = 1
# q1=(0.2,1) item A: g1 .981, g2 .832, g0 .196, g3 -.196 -> A at ranks 2, 3:
#     first hit 2, AP = (1/2 + 2/3)/2 = 7/12
# q2=(-1,-0.1) item B: g3 .995, g1 -.0995, g2 -.774, g0 -.995 -> B at rank 2:
#     first hit 2, AP = 1/2
# q3=(0,1) item D: D is not in the gallery -> left out of every mean.
QUERIES = [[1.0, 0.2], [0.2, 1.0], [-1.0, -0.1], [0.0, 1.0]]
QUERY_ITEMS = ["A", "A", "B", "D"]
REGIONS = ["SG", "SG", "VN", "VN"]


def test_recall_and_map_by_hand(device):
    metrics = retrieval_metrics(torch.tensor(QUERIES, device=device), QUERY_ITEMS,
                                torch.tensor(GALLERY, device=device), GALLERY_ITEMS, ks=(1, 2, 3),
                                groups={"region": REGIONS})
    # recall@1: only q0 of the three usable queries; by rank 2 all three have a hit.
    assert metrics["recall@1"] == pytest.approx(1 / 3)
    assert metrics["recall@2"] == pytest.approx(1.0)
    assert metrics["recall@3"] == pytest.approx(1.0)
    # mAP = (1 + 7/12 + 1/2) / 3 = 25/36
    assert metrics["mAP"] == pytest.approx(25 / 36)
    assert metrics["num_queries"] == 3 and metrics["num_without_relevant"] == 1
    assert metrics["map_exact"] is True
    sg, vn = metrics["groups"]["region"]["SG"], metrics["groups"]["region"]["VN"]
    # SG = {q0, q1}: recall@1 1/2, mAP (1 + 7/12)/2 = 19/24.  VN = {q2} (+ q3 without relevant).
    assert sg["recall@1"] == pytest.approx(0.5) and sg["mAP"] == pytest.approx(19 / 24)
    assert vn["recall@1"] == 0.0 and vn["recall@2"] == 1.0 and vn["mAP"] == pytest.approx(0.5)
    assert vn["num_queries"] == 1 and vn["num_without_relevant"] == 1


def test_ranking_and_first_hit_by_hand():
    result = retrieve(torch.tensor(QUERIES), QUERY_ITEMS, torch.tensor(GALLERY), GALLERY_ITEMS,
                      depth=4, gallery_chunk=1, query_chunk=3)
    assert result.topk_indices[0].tolist() == [0, 2, 1, 3]
    assert result.topk_indices[1].tolist() == [1, 2, 0, 3]
    assert result.topk_indices[2].tolist() == [3, 1, 2, 0]
    assert result.first_hit_rank.tolist() == [1, 2, 2, 0]
    assert result.has_relevant.tolist() == [True, True, True, False]
    assert math.isnan(result.average_precision[3])
    assert result.topk_scores[0, 0] == pytest.approx(1 / math.sqrt(1.04), abs=1e-6)


# Leave-one-out on one set, all unit vectors: e0=(1,0) A, e1=(.8,.6) A, e2=(.6,.8) B, e3=(0,1) B.
# Cosines: e0e1 .8, e0e2 .6, e0e3 0, e1e2 .96, e1e3 .6, e2e3 .8.
# Own entry excluded: e0 -> e1(A) first: AP 1;  e1 -> e2(B), e0(A): AP 1/2;
#                     e2 -> e1(A), e3(B): AP 1/2;  e3 -> e2(B) first: AP 1.
# recall@1 = 2/4, mAP = 3/4.  Not excluded, every query finds itself first: recall@1 = 1, and
# e1 -> e1(A), e2(B), e0(A): AP (1 + 2/3)/2 = 5/6; e2 -> e2, e1, e3: 5/6; e0, e3: 1 -> mAP 11/12.
SET = [[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]]
SET_ITEMS = ["A", "A", "B", "B"]
SET_KEYS = ["k0", "k1", "k2", "k3"]


def test_exclude_same_key_by_hand(device):
    embeddings = torch.tensor(SET, device=device)
    excluded = retrieval_metrics(embeddings, SET_ITEMS, embeddings, SET_ITEMS, ks=(1, 2),
                                 exclude_same_key=True, query_keys=SET_KEYS, gallery_keys=SET_KEYS)
    assert excluded["recall@1"] == pytest.approx(0.5)
    assert excluded["recall@2"] == pytest.approx(1.0)
    assert excluded["mAP"] == pytest.approx(0.75)
    by_position = retrieval_metrics(embeddings, SET_ITEMS, embeddings, SET_ITEMS, ks=(1, 2),
                                    exclude_same_key=True)
    assert by_position["mAP"] == pytest.approx(0.75)
    kept = retrieval_metrics(embeddings, SET_ITEMS, embeddings, SET_ITEMS, ks=(1,))
    assert kept["recall@1"] == 1.0 and kept["mAP"] == pytest.approx(11 / 12)


def _brute_force(query, query_items, gallery, gallery_items):
    """Reference: full similarity matrix, full sort, AP as the textbook sum of precision@rank."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    scores = q @ g.T
    first, ap = [], []
    for row, item in zip(scores, query_items):
        order = np.argsort(-row, kind="stable")
        hits = np.array([gallery_items[i] == item for i in order])
        first.append(int(hits.argmax()) + 1 if hits.any() else 0)
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        ap.append((precision * hits).sum() / hits.sum() if hits.any() else np.nan)
    return np.array(first), np.array(ap)


@pytest.mark.parametrize("items_in_gallery", [5, 60])  # 5 -> 60 relevant each: the sorting path
def test_chunked_search_matches_brute_force(device, items_in_gallery):
    generator = torch.Generator().manual_seed(0)
    gallery = torch.randn(300, 16, generator=generator, dtype=torch.float64)
    query = torch.randn(70, 16, generator=generator, dtype=torch.float64)
    gallery_items = (torch.arange(300) % items_in_gallery).tolist()
    query_items = torch.randint(0, items_in_gallery + 2, (70,), generator=generator).tolist()
    result = retrieve(query.to(device), query_items, gallery.to(device), gallery_items, depth=10,
                      query_chunk=16, gallery_chunk=37)
    first, ap = _brute_force(query.numpy(), query_items, gallery.numpy(), gallery_items)
    expected_first = np.where((first >= 1) & (first <= 10), first, 0)
    assert result.first_hit_rank.tolist() == expected_first.tolist()
    np.testing.assert_allclose(result.average_precision, ap, rtol=1e-4, equal_nan=True)
    whole = retrieve(query, query_items, gallery, gallery_items, depth=10)
    assert (whole.topk_indices == result.topk_indices).all()


def test_depth_beyond_gallery_is_padded():
    result = retrieve(torch.tensor(QUERIES), QUERY_ITEMS, torch.tensor(GALLERY), GALLERY_ITEMS,
                      depth=6)
    assert result.topk_indices[:, 4:].tolist() == [[-1, -1]] * 4
    summary = summarize(result, ks=(1, 6))
    assert summary["recall@6"] == 1.0


@pytest.mark.parametrize("call, message", [
    (lambda: retrieve(torch.zeros(2, 3), ["a", "b"], torch.zeros(2, 4), ["a", "b"]), "width"),
    (lambda: retrieve(torch.zeros(2, 3), ["a"], torch.zeros(2, 3), ["a", "b"]), "query item"),
    (lambda: retrieve(torch.zeros(2, 3), ["a", "b"], torch.zeros(0, 3), []), "empty"),
    (lambda: retrieve(torch.ones(1, 3), ["a"], torch.ones(1, 3), ["a"], backend="annoy"),
     "backend"),
    (lambda: retrieval_metrics(torch.ones(1, 3), ["a"], torch.ones(2, 3), ["a", "b"],
                               exclude_same_key=True), "same length"),
    (lambda: retrieve(torch.ones(1, 3), ["a"], torch.ones(2, 3), ["a", "b"], query_keys=["x"],
                      gallery_keys=["x", "x"]), "twice"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


class _FakeFaiss:
    """A stand-in for faiss's exact inner-product index (faiss is optional and absent in CI)."""

    class IndexFlatIP:
        def __init__(self, dim):
            self.vectors = np.zeros((0, dim), dtype=np.float32)

        def add(self, vectors):
            self.vectors = np.concatenate([self.vectors, vectors])

        def search(self, queries, k):
            scores = queries @ self.vectors.T
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(scores, order, axis=1), order


def test_faiss_backend_agrees_with_torch(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "faiss", _FakeFaiss)
    embeddings = torch.tensor(SET)
    exact = retrieval_metrics(embeddings, SET_ITEMS, embeddings, SET_ITEMS, ks=(1, 2),
                              exclude_same_key=True)
    faiss = retrieval_metrics(embeddings, SET_ITEMS, embeddings, SET_ITEMS, ks=(1, 2),
                              exclude_same_key=True, backend="faiss")
    assert faiss["recall@1"] == exact["recall@1"] and faiss["recall@2"] == exact["recall@2"]
    # The whole (3-entry) ranking fits in map_depth, so the bound is exact here.
    assert faiss["mAP"] == pytest.approx(exact["mAP"]) and faiss["map_exact"] is False
