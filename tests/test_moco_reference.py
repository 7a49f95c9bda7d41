"""Our MoCo and lightly's MoCo pieces agree step for step from the same init on the same views."""

import copy

import pytest
import torch

pytest.importorskip("lightly")

from bench.moco_reference import LightlyMoCo  # noqa: E402
from ecomaug.moco import MoCo  # noqa: E402


def _views(generator: torch.Generator, steps: int, batch: int = 8, size: int = 32):
    return [(torch.randn(batch, 3, size, size, generator=generator),
             torch.randn(batch, 3, size, size, generator=generator)) for _ in range(steps)]


def _train(model, views, *, m: float, reference: bool) -> list[float]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for view_q, view_k in views:
        loss = model.step(view_q, view_k, m=m)[0] if reference else model(view_q, view_k, m=m).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_moco_matches_lightly_step_for_step():
    torch.manual_seed(0)
    ours = MoCo("test_resnet", dim=16, hidden_dim=32, K=32, m=0.9, T=0.2, shuffle_bn=False, bn_splits=1)
    reference = LightlyMoCo.from_moco(ours)
    views = _views(torch.Generator().manual_seed(1), steps=6)  # 6 x 8 keys wrap the queue of 32
    ours_losses = _train(ours, views, m=0.9, reference=False)
    reference_losses = _train(reference, views, m=0.9, reference=True)
    assert ours_losses == pytest.approx(reference_losses, rel=1e-4, abs=1e-5)
    assert ours_losses[0] != pytest.approx(ours_losses[-1])  # it did train
    torch.testing.assert_close(ours.queue.T, reference.criterion.memory_bank.bank, rtol=1e-3, atol=1e-4)
    for theirs, mine in ((reference.backbone, ours.encoder_q.backbone),
                         (reference.backbone_momentum, ours.encoder_k.backbone)):
        for (name, a), b in zip(theirs.state_dict().items(), mine.state_dict().values()):
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=2e-3, msg=name)  # float rounding, amplified by 6 steps


def test_shuffle_bn_is_the_only_difference_and_it_changes_the_keys():
    torch.manual_seed(0)
    exact = MoCo("test_resnet", dim=16, hidden_dim=32, K=32, m=0.9, T=0.2, shuffle_bn=False, bn_splits=1)
    shuffled = copy.deepcopy(exact)
    shuffled.shuffle_bn, shuffled.bn_splits = True, 4
    views = _views(torch.Generator().manual_seed(2), steps=1)
    loss_exact = _train(exact, views, m=0.9, reference=False)[0]
    loss_shuffled = _train(shuffled, views, m=0.9, reference=False)[0]
    # Ghost BN over 4 shuffled splits normalises the keys with other statistics: a real, intended
    # difference from lightly's single-device example (explained in bench/moco_reference.py).
    assert loss_exact != pytest.approx(loss_shuffled, rel=1e-6)
