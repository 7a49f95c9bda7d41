"""Ranks read disjoint parts that together cover the epoch; with drop_last every rank is equal."""

from __future__ import annotations

import collections

import pytest

import loaders
from loaders.build import dali_available
from loaders.sharding import merged_chunk_order, plan_epoch, rank_range

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
BACKENDS = ["torch", pytest.param("dali", marks=needs_dali)]
SAMPLES = 320


def rank_keys(shards, backend, world_size, *, drop_last, batch_size=40, epoch=1):
    per_rank = []
    for rank in range(world_size):
        loader = loaders.build_loader(
            shards, backend=backend, device="cpu", batch_size=batch_size, crop_size=32, seed=11,
            epoch=epoch, rank=rank, world_size=world_size, drop_last=drop_last,
            num_workers=0 if backend == "torch" else 1)
        batches = [batch.keys for batch in loader]
        assert len(batches) == len(loader)
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_and_cover_every_sample_once(sample_shards, backend, world_size):
    per_rank = rank_keys(sample_shards, backend, world_size, drop_last=False)
    seen = collections.Counter(key for batches in per_rank for keys in batches for key in keys)
    assert len(seen) == SAMPLES and set(seen.values()) == {1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_last_gives_every_rank_the_same_number_of_full_batches(sample_shards, backend):
    # 320 samples over 3 ranks: 107/107/106; batch 25 -> 4 full batches each, never 5 on one rank
    per_rank = rank_keys(sample_shards, backend, 3, drop_last=True, batch_size=25)
    assert [len(batches) for batches in per_rank] == [4, 4, 4]
    assert all(len(keys) == 25 for batches in per_rank for keys in batches)
    all_keys = [key for batches in per_rank for keys in batches for key in keys]
    assert len(all_keys) == len(set(all_keys))


def test_backends_give_a_rank_the_same_samples(sample_shards):
    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    torch_ranks = rank_keys(sample_shards, "torch", 3, drop_last=False)
    dali_ranks = rank_keys(sample_shards, "dali", 3, drop_last=False)
    for torch_batches, dali_batches in zip(torch_ranks, dali_ranks):
        assert sorted(k for keys in torch_batches for k in keys) == sorted(k for keys in dali_batches for k in keys)


@pytest.mark.parametrize("counts", [[64, 64, 64, 64, 64], [7, 30, 1, 13], [5]])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_plan_splits_every_sample_once_and_drop_last_is_even(counts, world_size):
    total = sum(counts)
    covered = collections.Counter()
    lengths = []
    for rank in range(world_size):
        plan = plan_epoch(counts, batch_size=2, seed=3, epoch=4, rank=rank, world_size=world_size,
                          drop_last=False, shuffle=True)
        assert plan.num_samples == sum(s.count for s in plan.segments)
        assert plan.num_batches == -(-plan.num_samples // 2)
        covered.update((s.shard, i) for s in plan.segments for i in range(s.start, s.stop))
        if total // world_size >= 2:
            lengths.append(plan_epoch(counts, batch_size=2, seed=3, epoch=4, rank=rank,
                                      world_size=world_size, drop_last=True, shuffle=True).num_batches)
    assert sorted(covered) == sorted((shard, i) for shard, c in enumerate(counts) for i in range(c))
    assert set(covered.values()) == {1}
    assert len(set(lengths)) <= 1
    assert rank_range(total, world_size - 1, world_size)[1] == total


def test_shard_order_depends_on_seed_plus_epoch_and_eval_keeps_it():
    counts = [10] * 12
    orders = {plan_epoch(counts, batch_size=4, seed=0, epoch=e, rank=0, world_size=1, drop_last=True,
                         shuffle=True).shard_order for e in range(4)}
    assert len(orders) == 4
    kept = plan_epoch(counts, batch_size=4, seed=0, epoch=3, rank=0, world_size=1, drop_last=False, shuffle=False)
    assert kept.shard_order == tuple(range(12))


def test_merged_chunk_order_is_round_robin_over_workers_with_data():
    assert merged_chunk_order([2, 1, 3]) == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (2, 2)]
