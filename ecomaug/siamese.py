"""A supervised baseline: a siamese encoder trained on item_id pairs.

Both views go through the *same* encoder (timm backbone + projection head, as in MoCo); every
other view in the batch with the same ``item_id`` is a positive, every view of another item a
negative. The loss is the supervised contrastive loss (Khosla et al. 2020) over the 2N views,
which for one positive per anchor is exactly InfoNCE. It is the yardstick MoCo's self-supervised
embedding is compared against in the item-matching evaluation.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ecomaug.distributed import encode_in_splits
from ecomaug.listing_views import item_id_of
from ecomaug.moco import Encoder
from ecomaug.objective import ContrastiveOutput


def item_labels(meta: Sequence[dict[str, Any]], *, device: torch.device | str | None = None) -> torch.Tensor:
    """Map each sample's ``item_id`` to an integer label (equal ids, equal labels).

    Raises:
        ValueError: when a sample has no ``item_id`` (the siamese objective needs one).

    Shape:
        - returns :math:`(N,)` long.
    """
    ids: dict[str, int] = {}
    labels = []
    for index, sample in enumerate(meta):
        item_id = item_id_of(sample)
        if item_id is None:
            raise ValueError(f"the siamese objective needs an item_id for every sample; sample "
                             f"{sample.get('key', index)!r} has none (shard the data from a manifest "
                             f"with an item_id column)")
        labels.append(ids.setdefault(item_id, len(ids)))
    return torch.tensor(labels, dtype=torch.long, device=device)


def supervised_contrastive_loss(z: torch.Tensor, labels: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Supervised contrastive loss: for each anchor, the mean log-probability of its positives.

    Args:
        z: L2-normalised embeddings.
        labels: class (item) of each embedding.
        T: temperature.

    Returns:
        The loss and the fraction of anchors whose nearest other embedding is a positive.

    Shape:
        - z: :math:`(M, D)`; labels: :math:`(M,)`.
    """
    z = z.float()
    count = z.shape[0]
    self_mask = torch.eye(count, dtype=torch.bool, device=z.device)  # M x M
    logits = (z @ z.T / T).masked_fill(self_mask, float("-inf"))  # M x M
    positives = (labels[:, None] == labels[None, :]) & ~self_mask  # M x M
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # M x M
    positive_count = positives.sum(dim=1).clamp(min=1)  # M
    loss = -(log_prob.masked_fill(~positives, 0.0).sum(dim=1) / positive_count).mean()
    with torch.no_grad():
        accuracy = positives.gather(1, logits.argmax(dim=1, keepdim=True)).float().mean()
    return loss, accuracy


class Siamese(nn.Module):
    """One encoder for both views, trained with item_id labels.

    Args:
        model_name: any timm model name (``pretrained=False, num_classes=0``).
        dim: embedding size of the projection head.
        hidden_dim: hidden size of the projection MLP.
        T: temperature of the supervised contrastive loss.
        bn_splits: sub-batches normalised separately (ghost BN), as in :class:`~ecomaug.moco.MoCo`.
        img_size: side of the training crops, for backbones built for one input size (ViTs).

    Shape:
        - view_1, view_2: :math:`(N, 3, H, W)`; labels: :math:`(N,)`.
    """

    def __init__(self, model_name: str, *, dim: int = 128, hidden_dim: int = 2048, T: float = 0.2,
                 bn_splits: int = 1, img_size: int | None = None) -> None:
        super().__init__()
        if T <= 0:
            raise ValueError(f"temperature T must be > 0, got {T}")
        self.model_name, self.T, self.bn_splits = model_name, T, bn_splits
        self.encoder = Encoder(model_name, dim=dim, hidden_dim=hidden_dim, img_size=img_size)

    backbone_prefix = "encoder.backbone."

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        return {}  # no schedule of its own

    def load_backbone(self, weights: dict[str, torch.Tensor]) -> None:
        self.encoder.backbone.load_state_dict(weights)  # strict

    def generators(self) -> dict[str, torch.Generator]:
        return {}

    def encoders(self) -> list[nn.Module]:
        return [self.encoder]

    def summary(self) -> dict[str, Any]:
        return {"queue_ptr": None, "queue_sum": None}  # no queue

    def health(self) -> dict[str, float]:
        return {}  # no queue to watch

    def forward(self, view_1: torch.Tensor, view_2: torch.Tensor, *, labels: torch.Tensor | None = None,
                meta: Sequence[dict[str, Any]] | None = None) -> ContrastiveOutput:
        """The supervised contrastive loss of both views; ``labels`` default to ``item_labels(meta)``.

        Raises:
            ValueError: neither ``labels`` nor ``meta`` given, or a sample without an item_id.
        """
        if labels is None:
            if meta is None:
                raise ValueError("the siamese objective needs labels= or meta= (each sample's item_id)")
            labels = item_labels(meta, device=view_1.device)
        views = torch.cat([view_1, view_2], dim=0)  # 2N x 3 x H x W
        z = F.normalize(encode_in_splits(self.encoder, views, self.bn_splits), dim=1)  # 2N x D
        loss, accuracy = supervised_contrastive_loss(z, torch.cat([labels, labels]), self.T)
        return ContrastiveOutput(loss=loss, accuracy=accuracy)
