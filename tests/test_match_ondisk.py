"""An index beyond RAM (``match --index-on-disk``): its lists in a file of their own, built a chunk
at a time, searched as the in-memory index is, reused, refused when the lists file is gone or
another's; and faiss on the GPU where the device is CUDA and faiss has GPU support (faked here:
this machine has faiss-cpu and no GPU)."""

from __future__ import annotations

import importlib
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ecomaug.matching.gpu import faiss_gpu, search_copy
from ecomaug.matching.index import IndexPlan, build_within_budget, plan_index, plans_for, serialized_bytes
from ecomaug.matching.ondisk import lists_path
from test_match_index import _clustered

faiss = pytest.importorskip("faiss")
# the package exports a function named search: the modules themselves, to patch them
index_module = importlib.import_module("ecomaug.matching.index")
search_module = importlib.import_module("ecomaug.matching.search")
BUDGET = 512 * 1024



@pytest.fixture(scope="module")
def database() -> torch.Tensor:
    return _clustered(20_000, 32, 0)


@pytest.fixture(scope="module")
def query(database) -> torch.Tensor:
    noise = torch.randn((500, 32), generator=torch.Generator().manual_seed(1))
    return torch.nn.functional.normalize(database[:500] + 0.02 * noise, dim=1)


def test_on_disk_plans_are_ivf_sized_without_their_lists():
    every = plans_for(20_000, 32, on_disk=True)
    assert every and all(plan.on_disk and plan.nlist for plan in every)  # no HNSW, no flat
    assert "HNSW32" not in {plan.factory for plan in plans_for(5000, 64, on_disk=True)}
    best = plan_index(20_000, 32, BUDGET, on_disk=True)[0]
    assert best.factory == "IVF128,Flat" and best.estimated_bytes < 64 * 1024  # 128 centroids, not 2.6 MB of lists
    assert plan_index(20_000, 32, BUDGET)[0].factory == "IVF128,PQ8x8"  # in RAM the vectors do not fit
    with pytest.raises(ValueError, match="in RAM, its lists on disk; give at least that") as error:
        plan_index(10**7, 2048, 64 * 1024, on_disk=True)
    assert "\n" not in str(error.value)


# PQ's 256-centroid training is the slow part: the PQ indexes get a smaller database (8000 rows, still
# four shards); the flat one the full 20,000 (seven)
@pytest.mark.parametrize("factory, family, m, count", [("IVF64,Flat", "IVF-Flat", 0, 20_000),
                                                       ("IVF64,PQ8x8", "IVF-PQ", 8, 8000),
                                                       ("OPQ4_16,IVF64,PQ4x8", "OPQ+IVF-PQ", 4, 8000)])
def test_on_disk_build_searches_as_the_in_memory_index(tmp_path, monkeypatch, database, query, factory, family, m,
                                                       count):
    vectors = np.ascontiguousarray(database[:count].numpy())
    monkeypatch.setattr(index_module, "ADD_CHUNK", 3000)
    memory, memory_info = build_within_budget(vectors, [IndexPlan(factory, family, 0, 64, m)], 2**30, seed=3)
    lists = tmp_path / "db.ivfdata"
    disk, info = build_within_budget(vectors, [IndexPlan(factory, family, 0, 64, m, on_disk=True)], 2**30,
                                     seed=3, lists_file=lists)
    assert info["on_disk"] and not memory_info["on_disk"] and disk.ntotal == memory.ntotal == count
    code_bytes = faiss.extract_index_ivf(memory).code_size
    assert info["lists_bytes"] == lists.stat().st_size == count * (code_bytes + 8)
    # the index file is the in-memory serialisation less its lists (plus each list's offset and the file's name)
    in_ram = serialized_bytes(memory) - info["lists_bytes"]
    assert in_ram <= info["index_bytes"] == serialized_bytes(disk) <= in_ram + 24 * 64 + 256
    assert not list(tmp_path.glob(".shards-*"))  # the shards are gone
    for index in (memory, disk):
        faiss.extract_index_ivf(index).nprobe = 16
    expected, found = memory.search(query.numpy(), 10), disk.search(query.numpy(), 10)
    assert (found[1] == expected[1]).all() and (found[1][:, 0] >= 0).all()
    np.testing.assert_array_equal(found[0], expected[0])


def test_search_on_disk_is_saved_reused_and_recorded(tmp_path, database, query):
    saved = tmp_path / "index" / "b.faiss"
    first = search_module.search(query, database, k=10, index_path=saved, database_id="db",
                                 max_index_memory=BUDGET, index_on_disk=True)
    info = first.info
    assert first.method == "budget" and info["on_disk"] and info["index_type"] == "IVF-Flat"
    assert saved.stat().st_size == info["index_bytes"] <= BUDGET < lists_path(saved).stat().st_size
    assert info["lists_file"] == "b.ivfdata" and info["lists_bytes"] == lists_path(saved).stat().st_size
    assert info["recall_vs_exact"] >= 0.95 and info["faiss_device"] == "cpu"
    assert (first.indices[:, 0] == np.arange(500)).mean() >= 0.95
    shutil.move(str(saved.parent), str(tmp_path / "moved"))  # the lists are found beside the index
    again = search_module.search(query, database, k=10, index_path=tmp_path / "moved" / "b.faiss",
                                 database_id="db", max_index_memory=BUDGET, index_on_disk=True)
    assert again.info["reused"] and (again.indices == first.indices).all()
    np.testing.assert_allclose(again.scores, first.scores, rtol=1e-6)
    in_memory = search_module.search(query, database, k=10, index_path=tmp_path / "moved" / "b.faiss",
                                     database_id="db", max_index_memory=BUDGET)
    assert not in_memory.info["reused"] and not in_memory.info["on_disk"]  # asked in RAM: rebuilt
    assert not lists_path(tmp_path / "moved" / "b.faiss").exists()  # and the stale lists file removed
    with pytest.raises(ValueError, match="--index-on-disk needs --max-index-memory"):
        search_module.search(query, database, k=10, index_path=saved, exact_limit=0, index_on_disk=True)


def test_a_missing_or_foreign_lists_file_is_one_line(tmp_path, database, query):
    common = dict(k=10, database_id="db", max_index_memory=BUDGET, index_on_disk=True)
    saved, other = tmp_path / "b.faiss", tmp_path / "other" / "b.faiss"
    search_module.search(query, database, index_path=saved, **common)
    search_module.search(query, _clustered(20_000, 32, 5), index_path=other, **{**common, "database_id": "other"})
    assert lists_path(other).stat().st_size == lists_path(saved).stat().st_size  # only the digest tells them apart
    shutil.copy(lists_path(other), lists_path(saved))  # another index's lists, in its place
    with pytest.raises(ValueError, match="is not the lists file written with") as error:
        search_module.search(query, database, index_path=saved, **common)
    assert "\n" not in str(error.value)
    lists_path(saved).unlink()
    with pytest.raises(ValueError, match=r"b\.ivfdata, which is missing: restore it, or delete") as error:
        search_module.search(query, database, index_path=saved, **common)
    assert "\n" not in str(error.value)


class FakeGpu:
    """faiss's GPU functions on a machine without one: records each copy, returns the CPU index."""

    def __init__(self, monkeypatch, gpus: int = 1) -> None:
        self.copies: list[tuple[int, str]] = []
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: gpus)
        monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "resources", raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", self.index_cpu_to_gpu, raising=False)

    def index_cpu_to_gpu(self, resources: str, gpu: int, index):
        assert resources == "resources"
        self.copies.append((gpu, type(faiss.downcast_index(index)).__name__))
        return index


def test_faiss_uses_the_gpu_only_on_cuda_with_gpu_support(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ecomaug.matching.gpu")
    assert faiss_gpu(faiss, torch.device("cuda")) is None  # faiss-cpu: no GPUs
    assert "no GPU support" in caplog.text
    fake = FakeGpu(monkeypatch, gpus=2)
    assert faiss_gpu(faiss, torch.device("cpu")) is None and faiss_gpu(faiss, None) is None
    assert faiss_gpu(faiss, torch.device("cuda")) == 0 and faiss_gpu(faiss, torch.device("cuda:1")) == 1
    assert "faiss on the GPU: cuda:1" in caplog.text
    index = faiss.IndexFlatIP(8)
    assert search_copy(faiss, index, None) == (index, "cpu")
    assert search_copy(faiss, index, 0, on_disk=True) == (index, "cpu")  # lists on disk stay on the CPU
    assert search_copy(faiss, index, 0, family="HNSW") == (index, "cpu")
    assert fake.copies == []
    assert search_copy(faiss, index, 1) == (index, "cuda:1") and fake.copies == [(1, "IndexFlatIP")]


def test_a_gpu_copy_faiss_refuses_stays_on_the_cpu(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ecomaug.matching.gpu")
    FakeGpu(monkeypatch)

    def refuse(resources, gpu, index):
        raise RuntimeError("Error: GPU index only supports up to 96 bytes per code\nmore")

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", refuse)
    index = faiss.IndexFlatIP(8)
    assert search_copy(faiss, index, 0) == (index, "cpu") and "96 bytes per code" in caplog.text


def test_search_on_cuda_trains_and_searches_on_the_gpu_and_saves_the_cpu_copy(tmp_path, monkeypatch, database,
                                                                                 query):
    fake = FakeGpu(monkeypatch)
    exact = search_module.exact_search  # this machine's torch has no CUDA: exact search on the CPU
    monkeypatch.setattr(search_module, "exact_search", lambda *args, device=None, **kw: exact(*args, **kw))
    saved = tmp_path / "b.faiss"
    result = search_module.search(query, database, k=10, index_path=saved, database_id="db",
                                  max_index_memory=BUDGET, device=torch.device("cuda"))
    assert result.info["faiss_device"] == "cuda:0" and result.info["recall_vs_exact"] >= 0.9
    # the coarse k-means on the GPU (a flat IP index), then the tuned index copied for the search
    assert fake.copies == [(0, "IndexFlatIP"), (0, "IndexIVFPQ")]
    assert type(faiss.read_index(str(saved))).__name__ == "IndexIVFPQ"  # the saved copy is a CPU index
    on_disk = search_module.search(query, database, k=10, index_path=tmp_path / "d.faiss", database_id="db",
                                   max_index_memory=BUDGET, device=torch.device("cuda"), index_on_disk=True)
    assert on_disk.info["faiss_device"] == "cpu" and fake.copies[2:] == [(0, "IndexFlatIP")]  # trained there only


def test_match_index_on_disk_in_summary_and_without_a_budget(tmp_path):
    from ecomaug.cli import main
    from ecomaug.evaluation.embeddings import Embeddings

    vectors = _clustered(8000, 32, 0)
    for name in ("a", "b"):
        Embeddings(vectors, [f"{name}{i}" for i in range(len(vectors))], [{} for _ in range(len(vectors))],
                   {"source": "test"}).save(tmp_path / f"{name}.npz")
    common = ["match", "--a", str(tmp_path / "a.npz"), "--b", str(tmp_path / "b.npz"), "--no-report",
              "--device", "cpu", "--no-progress", "--threshold", "0.9", "--index-on-disk"]
    bad = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1
    assert "--index-on-disk needs --max-index-memory" in bad.output
    run = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "out"), "--max-index-memory", "64K"])
    assert run.exit_code == 0, run.output
    searches = json.loads((tmp_path / "out" / "summary.json").read_text())["searches"]
    for name in ("a_to_b", "b_to_a", "b_to_b", "a_to_a"):
        assert searches[name]["on_disk"] and searches[name]["index_bytes"] <= 64 * 1024
        lists = tmp_path / "out" / "index" / searches[name]["lists_file"]
        assert searches[name]["lists_bytes"] == lists.stat().st_size > 64 * 1024
    assert searches["b_to_b"]["reused"] and searches["a_to_a"]["reused"]
