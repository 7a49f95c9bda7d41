"""MoCo's pieces against hand-written references: queue, momentum, InfoNCE, shuffle BN."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from ecomaug.distributed import batch_shuffle, batch_unshuffle, encode_in_splits
from ecomaug.moco import MoCo, info_nce, momentum_at, resolve_queue_size
from ecomaug.siamese import Siamese, item_labels, supervised_contrastive_loss

TINY = dict(dim=16, hidden_dim=32, T=0.2)


def tiny_moco(**overrides) -> MoCo:
    return MoCo("test_resnet", **{**TINY, "K": 24, "m": 0.9, **overrides})


def test_enqueue_matches_reference_with_wraparound():
    model = tiny_moco(K=10)
    reference = model.queue.clone()
    pointer = 0
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):  # 4 x 4 keys into 10 slots: wraps around twice
        keys = F.normalize(torch.randn(4, 16, generator=generator), dim=1)
        model.dequeue_and_enqueue(keys)
        for row in keys:  # the oldest slot is overwritten, one key at a time
            reference[:, pointer] = row
            pointer = (pointer + 1) % 10
        assert int(model.queue_ptr) == pointer
        torch.testing.assert_close(model.queue, reference)
    with pytest.raises(ValueError, match="do not fit"):
        model.dequeue_and_enqueue(torch.randn(11, 16))


def test_momentum_update_matches_reference():
    model = tiny_moco()
    with torch.no_grad():
        for param in model.encoder_q.parameters():
            param.add_(torch.randn_like(param))
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    query = [p.clone() for p in model.encoder_q.parameters()]
    model.momentum_update(0.7)
    for new, old, q in zip(model.encoder_k.parameters(), before_k, query):
        torch.testing.assert_close(new, 0.7 * old + 0.3 * q)
        assert not new.requires_grad
    model.momentum_update(1.0)  # m = 1 keeps the key encoder frozen
    for new, old, q in zip(model.encoder_k.parameters(), before_k, query):
        torch.testing.assert_close(new, 0.7 * old + 0.3 * q)


def test_info_nce_matches_reference():
    generator = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 8, generator=generator), dim=1)
    k = F.normalize(torch.randn(5, 8, generator=generator), dim=1)
    queue = F.normalize(torch.randn(8, 7, generator=generator), dim=0)
    loss, logits = info_nce(q, k, queue, T=0.2)
    expected = 0.0
    for i in range(5):
        positive = math.exp(float(q[i] @ k[i]) / 0.2)
        negatives = sum(math.exp(float(q[i] @ queue[:, j]) / 0.2) for j in range(7))
        expected += -math.log(positive / (positive + negatives))
    assert logits.shape == (5, 8)
    assert loss.item() == pytest.approx(expected / 5, rel=1e-5)


def test_shuffle_unshuffle_is_identity_on_outputs():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(12, 3, 4, 4)
    per_sample = lambda t: t.flatten(1) * 2 + 1  # noqa: E731  any per-sample function
    shuffled, idx_unshuffle = batch_shuffle(x, generator=generator)
    assert not torch.equal(shuffled, x)
    torch.testing.assert_close(batch_unshuffle(per_sample(shuffled), idx_unshuffle), per_sample(x))


def test_split_batch_norm_normalises_each_split_separately():
    bn = torch.nn.BatchNorm1d(3)
    x = torch.randn(8, 3)
    split = encode_in_splits(bn, x, 2)
    torch.testing.assert_close(split, torch.cat([F.batch_norm(c, None, None, training=True) for c in x.chunk(2)]))
    with pytest.raises(ValueError, match="splits"):
        encode_in_splits(bn, x, 16)


def test_moco_forward_updates_queue_and_backpropagates(device):
    model = tiny_moco(bn_splits=2).to(device)
    views = [torch.rand(8, 3, 32, 32, device=device) for _ in range(2)]
    output = model(*views)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    assert 0.0 <= output.accuracy.item() <= 1.0
    assert int(model.queue_ptr) == 8
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(24, device=device))
    output.loss.backward()
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())


def test_shuffled_keys_equal_unshuffled_keys_in_eval_mode():
    """With BN statistics frozen, shuffle BN must not change any key: shuffle is then a no-op."""
    model = tiny_moco(m=1.0).eval()
    views = torch.rand(8, 3, 32, 32)
    model(views, views)
    shuffled_keys = model.queue[:, :8].clone()
    plain = tiny_moco(m=1.0, shuffle_bn=False).eval()
    plain.load_state_dict(model.state_dict())
    plain.queue_ptr.zero_()
    plain(views, views)
    torch.testing.assert_close(plain.queue[:, :8], shuffled_keys)


def test_moco_v3_forward():
    model = MoCo("test_vit", version="v3", **TINY)
    assert model.bn_splits == 1  # no batch norm in a ViT backbone: no ghost BN
    output = model(torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32))
    output.loss.backward()
    assert torch.isfinite(output.loss)


def test_queue_size_is_adapted_or_refused():
    assert resolve_queue_size(65536, num_samples=None, global_batch=256) == (65536, None)
    assert resolve_queue_size(256, num_samples=1000, global_batch=32) == (256, None)
    K, message = resolve_queue_size(65536, num_samples=320, global_batch=32)
    assert K == 288 and "using K=288" in message
    with pytest.raises(ValueError, match="too small"):
        resolve_queue_size(65536, num_samples=40, global_batch=32)
    with pytest.raises(ValueError, match="smaller than the global batch"):
        resolve_queue_size(16, num_samples=None, global_batch=32)


def test_momentum_cosine_ramp():
    assert momentum_at(0, 100, 0.99, "cosine") == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99, "cosine") == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99, "cosine") == pytest.approx(1.0)
    assert momentum_at(50, 100, 0.99) == 0.99
    with pytest.raises(ValueError, match="schedule"):
        momentum_at(0, 10, 0.99, "linear")


def test_supervised_contrastive_loss_matches_reference():
    generator = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(6, 4, generator=generator), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    loss, _ = supervised_contrastive_loss(z, labels, T=0.5)
    terms = []
    for i in range(6):
        denominator = sum(math.exp(float(z[i] @ z[j]) / 0.5) for j in range(6) if j != i)
        positives = [j for j in range(6) if j != i and labels[j] == labels[i]]
        if positives:
            terms.append(-sum(float(z[i] @ z[j]) / 0.5 - math.log(denominator) for j in positives) / len(positives))
        else:
            terms.append(0.0)
    assert loss.item() == pytest.approx(sum(terms) / 6, rel=1e-5)


def test_siamese_needs_item_ids():
    assert item_labels([{"item_id": "a"}, {"item_id": "b"}, {"item_id": "a"}]).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="item_id"):
        item_labels([{"item_id": "a"}, {"key": "k2"}])
    model = Siamese("test_resnet", dim=16, hidden_dim=32)
    output = model(torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32), labels=torch.tensor([0, 0, 1, 2]))
    output.loss.backward()
    assert torch.isfinite(output.loss)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _shuffle_worker(rank: int, world_size: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        x = torch.arange(8 * 3, dtype=torch.float32).view(8, 3) + 100 * rank  # distinct per rank
        shuffled, idx_unshuffle = batch_shuffle(x, generator=torch.Generator().manual_seed(rank))
        restored = batch_unshuffle(shuffled * 3 - 1, idx_unshuffle)
        queue.put((rank, torch.equal(restored, x * 3 - 1), shuffled.sum().item() != x.sum().item()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_shuffle_unshuffle_across_two_ranks():
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_shuffle_worker, args=(rank, 2, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    results = sorted(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert [rank for rank, _, _ in results] == [0, 1]
    assert all(identity for _, identity, _ in results)
    assert any(mixed for _, _, mixed in results)  # samples really moved between ranks


def test_key_cos_is_the_mean_cosine_between_queued_keys_and_flags_collapse():
    moco = tiny_moco()
    queue = moco.queue  # D x K, unit columns
    cosines = queue.T @ queue
    brute = (cosines.sum() - cosines.diagonal().sum()) / (moco.K * (moco.K - 1))
    assert moco.health()["key_cos"] == pytest.approx(float(brute), abs=1e-5)
    assert abs(moco.health()["key_cos"]) < 0.2  # the random initial queue is spread
    moco.dequeue_and_enqueue(F.normalize(torch.ones(moco.K, queue.shape[0]), dim=1))  # one direction
    assert moco.health()["key_cos"] == pytest.approx(1.0, abs=1e-5)
    assert tiny_moco(version="v3").health() == {}  # no queue
