"""An index under a memory budget (``match --max-index-memory``): the sizes, the plan, the build
within the budget, true copies found first, exact scores, reuse, and summary.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ecomaug.limits import parse_size
from ecomaug.matching.index import IndexPlan, build_within_budget, plan_index, plans_for, rescore
from ecomaug.matching.search import choose_method, exact_search, search

BUDGET = 512 * 1024


def _clustered(count: int, dim: int, seed: int) -> torch.Tensor:
    """Unit vectors in tight clusters of 4, like several listings of one item."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(count // 4, dim, generator=generator)
    points = centres.repeat_interleave(4, dim=0) + 0.3 * torch.randn(count, dim, generator=generator)
    return torch.nn.functional.normalize(points, dim=1)


def _noisy_copies(database: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``count`` database rows plus noise of norm 0.1, and the rows they copy."""
    rows = np.random.default_rng(seed).choice(database.shape[0], size=count, replace=False)
    noise = torch.randn((count, database.shape[1]), generator=torch.Generator().manual_seed(seed))
    noisy = database[torch.from_numpy(rows)] + 0.1 * noise / database.shape[1] ** 0.5
    return torch.nn.functional.normalize(noisy, dim=1), rows


@pytest.mark.parametrize("text, size", [("32M", 32 * 2**20), ("500K", 500 * 1024), ("2g", 2 * 2**30),
                                        ("1.5GiB", int(1.5 * 2**30)), ("65536", 65536), (" 64 kb ", 65536)])
def test_sizes_are_powers_of_1024(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, message", [("abc", "takes a size like 500K"), ("32Q", "takes a size like"),
                                           ("-5M", "takes a size like"), ("", "takes a size like"),
                                           ("1K", "between 64K and 1T"), ("2T", "between 64K and 1T")])
def test_a_bad_size_is_one_line(text, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_size(text)
    assert "\n" not in str(error.value) and repr(text) in str(error.value)


def test_the_plan_is_the_most_accurate_index_that_fits():
    # the acceptance case: 300k x 128 floats are 146 MiB; 64 one-byte codes + an 8-byte id each fit 32M
    best = plan_index(300_000, 128, 32 * 2**20)[0]
    assert best.factory == "IVF512,PQ64x8" and best.estimated_bytes <= 32 * 2**20
    assert plan_index(20_000, 32, BUDGET)[0].factory == "IVF128,PQ8x8"
    # wider vectors than four dimensions a sub-quantizer: rotated (OPQ) down to 4 m first
    assert plan_index(20_000, 64, BUDGET)[0].factory == "OPQ12_48,IVF128,PQ12x8"
    assert plan_index(10**6, 2048, 2 * 2**30)[0].factory == "OPQ256_1024,IVF1024,PQ256x8"
    assert plan_index(300_000, 128, 2**30)[0].family == "IVF-Flat"  # the vectors themselves fit
    assert plan_index(5000, 64, 2**30)[0].factory == "HNSW32"
    every = plans_for(20_000, 32)
    assert [plan.family for plan in every][0] == "IVF-Flat" and every[0].estimated_bytes > BUDGET
    sizes = [plan.estimated_bytes for plan in every]
    assert sizes == sorted(sizes, reverse=True)  # most accurate (largest) first


def test_a_budget_no_index_fits_is_one_line_naming_the_minimum():
    with pytest.raises(ValueError, match=r"--max-index-memory 64.0K is too small for 10000000 x 128 vectors: "
                                         r"the smallest index \(OPQ4_16,IVF4096,PQ4x8\) needs about 114.8M") as error:
        plan_index(10**7, 128, 64 * 1024)
    assert "\n" not in str(error.value)


def test_the_rule_with_a_budget():
    assert choose_method(1000, dim=64, max_index_memory=BUDGET) == "exact"  # 256K of vectors fit
    assert choose_method(20_000, dim=64, max_index_memory=BUDGET) == "budget"
    assert choose_method(1000, dim=64, max_index_memory=BUDGET, exact_limit=0) == "budget"
    with pytest.raises(ValueError, match="give it with --index auto, not --index ivf"):
        choose_method(20_000, method="ivf", dim=64, max_index_memory=BUDGET)


def test_a_plan_over_the_budget_once_built_gives_way_to_the_next():
    pytest.importorskip("faiss")
    vectors = np.ascontiguousarray(_clustered(4000, 32, 0).numpy())  # IVF-Flat: 4000 x 136 bytes = 531K
    short = [IndexPlan("IVF16,Flat", "IVF-Flat", 1, 16), IndexPlan("IVF16,PQ8x8", "IVF-PQ", 1, 16, 8)]
    index, info = build_within_budget(vectors, short, 256 * 1024)
    assert info["kind"] == "IVF16,PQ8x8" and info["index_bytes"] <= 256 * 1024 and index.ntotal == 4000
    with pytest.raises(ValueError, match=r"no index fits once built \(IVF16,Flat 53"):
        build_within_budget(vectors, short[:1], 256 * 1024)


def test_rescore_keeps_the_best_candidates_by_their_exact_score():
    database = _clustered(40, 8, 0).numpy()
    queries = database[:3] + 0.01
    candidates = np.array([[5, 0, -1, 7], [1, 2, 3, 4], [-1, -1, 2, -1]])
    scores, indices = rescore(queries, database, candidates, 2, chunk=2)
    for row in range(2):
        exact = queries[row] @ database[candidates[row]].T
        order = np.argsort(-np.where(candidates[row] >= 0, exact, -np.inf))[:2]
        assert indices[row].tolist() == candidates[row][order].tolist()
        np.testing.assert_allclose(scores[row], exact[order], rtol=1e-5)
    assert indices[2].tolist() == [2, -1] and scores[2, 1] == -np.inf


def test_a_budgeted_index_fits_finds_true_copies_first_and_is_reused(tmp_path):
    pytest.importorskip("faiss")
    database = _clustered(20_000, 32, 0)  # 2.4 MiB of floats against a 512K budget
    query, rows = _noisy_copies(database, 1000, 1)
    saved = tmp_path / "db.faiss"
    result = search(query, database, k=10, index_path=saved, database_id="db", max_index_memory=BUDGET)
    info = result.info
    assert result.method == "budget" and info["index_type"] == "IVF-PQ" and info["kind"] == "IVF128,PQ8x8"
    assert saved.stat().st_size == info["index_bytes"] <= BUDGET
    assert info["max_index_memory"] == BUDGET and info["recall_k"] == 10 and info["recall_vs_exact"] >= 0.9
    assert {"nprobe", "build_seconds", "queries_per_second", "rescored_candidates"} <= set(info)
    assert (result.indices[:, 0] == rows).mean() >= 0.9
    # PQ only proposes: the scores are the exact cosines of the rows returned
    exact = np.einsum("qd,qkd->qk", query.numpy(), database.numpy()[result.indices])
    np.testing.assert_allclose(result.scores, exact, atol=1e-5)
    _, truth = exact_search(query, database, k=10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(result.indices, truth)]) >= 0.9
    again = search(query, database, k=10, index_path=saved, database_id="db", max_index_memory=BUDGET)
    assert again.info["reused"] and (again.indices == result.indices).all()
    other = search(query, database, k=10, index_path=saved, database_id="db", max_index_memory=640 * 1024)
    assert not other.info["reused"] and other.info["kind"] == "IVF128,PQ16x8"
    assert saved.stat().st_size <= 640 * 1024


def test_match_records_the_index_in_summary_and_refuses_a_bad_size(tmp_path):
    pytest.importorskip("faiss")
    from ecomaug.cli import main
    from ecomaug.evaluation.embeddings import Embeddings

    vectors = _clustered(8000, 32, 0)
    copies, _ = _noisy_copies(vectors, 8000, 2)
    for name, side in (("a", vectors), ("b", copies)):
        Embeddings(side, [f"{name}{i}" for i in range(len(side))], [{} for _ in range(len(side))],
                   {"source": "test"}).save(tmp_path / f"{name}.npz")
    common = ["match", "--a", str(tmp_path / "a.npz"), "--b", str(tmp_path / "b.npz"), "--no-report",
              "--device", "cpu", "--no-progress", "--threshold", "0.9"]
    bad = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "bad"), "--max-index-memory", "lots"])
    assert bad.exit_code == 2 and bad.output.strip().startswith("Error:") and len(bad.output.strip().splitlines()) == 1
    assert "--max-index-memory takes a size like 500K" in bad.output
    run = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "out"), "--max-index-memory", "384K"])
    assert run.exit_code == 0, run.output
    searches = json.loads((tmp_path / "out" / "summary.json").read_text())["searches"]
    for name in ("a_to_b", "b_to_a", "b_to_b", "a_to_a"):
        assert searches[name]["method"] == "budget" and searches[name]["index_bytes"] <= 384 * 1024
        assert searches[name]["index_type"] == "IVF-PQ" and searches[name]["recall_vs_exact"] > 0
    assert searches["b_to_b"]["reused"] and (tmp_path / "out" / "index" / "b.faiss").stat().st_size <= 384 * 1024
    assert "IVF64,PQ" in run.output  # the command names the index
