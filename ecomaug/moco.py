"""MoCo (He et al. 2020; v2: Chen et al. 2020; v3: Chen et al. 2021) around any timm backbone.

One module with the paper's symbols: ``K`` the queue length, ``m`` the key encoder's momentum,
``T`` the softmax temperature. The query encoder is a timm backbone plus a projection MLP; the
key encoder is its ``deepcopy``, updated only by :meth:`MoCo.momentum_update`. The queue is a
registered buffer (so it travels with ``state_dict`` into checkpoints) with its pointer.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ecomaug.distributed import (batch_shuffle, batch_unshuffle, concat_all_gather,
                                 encode_in_splits, get_rank)
from ecomaug.listing_views import NO_ITEM, item_codes, item_matches
from ecomaug.objective import ContrastiveOutput

VERSIONS = ("v2", "v3")
MOMENTUM_SCHEDULES = ("constant", "cosine")


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, *, layers: int = 2,
                   batch_norm: bool = False, last_batch_norm: bool = False) -> nn.Sequential:
    """The MLP head: ``layers`` linear layers with ReLU (and BN for MoCo v3) between them."""
    if layers < 1:
        raise ValueError(f"an MLP head needs at least 1 layer, got {layers}")
    modules: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
    for index in range(layers):
        last = index == layers - 1
        modules.append(nn.Linear(dims[index], dims[index + 1], bias=not (batch_norm and not last)))
        if not last:
            if batch_norm:
                modules.append(nn.BatchNorm1d(dims[index + 1]))
            modules.append(nn.ReLU(inplace=True))
        elif last_batch_norm:
            modules.append(nn.BatchNorm1d(dims[index + 1], affine=False))
    return nn.Sequential(*modules)


class Encoder(nn.Module):
    """A timm backbone (``pretrained=False``, no classifier) followed by a projection head.

    The backbone comes from :func:`ecomaug.export.create_backbone`, so that an export and the
    evaluation loaders rebuild exactly the same model (``img_size`` included).

    Shape:
        - input: :math:`(N, 3, H, W)` normalised float; output: :math:`(N, D)`.
    """

    def __init__(self, model_name: str, *, dim: int = 128, hidden_dim: int = 2048,
                 head_layers: int = 2, head_batch_norm: bool = False, img_size: int | None = None) -> None:
        super().__init__()
        from ecomaug.export import create_backbone

        self.backbone = create_backbone(model_name, img_size=img_size)  # ValueError for an unknown name
        self.head = projection_mlp(self.backbone.num_features, hidden_dim, dim, layers=head_layers,
                                   batch_norm=head_batch_norm, last_batch_norm=head_batch_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # N x D


def has_batch_norm(module: nn.Module) -> bool:
    """True when any layer of ``module`` normalises over the batch (where shuffle BN matters)."""
    return any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in module.modules())


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float,
             same_item: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's InfoNCE: each query's positive is its key, the negatives are the queue.

    Computed in float32 whatever the autocast dtype, because ``exp(logit / T)`` with T=0.2
    overflows float16 easily.

    Args:
        q: L2-normalised queries.
        k: L2-normalised positive keys.
        queue: L2-normalised negatives, one per column.
        T: the temperature.
        same_item: True where a queued key is of the query's own item (another photo of it: a
            false negative), left out of the softmax; None keeps every negative.

    Returns:
        The mean cross-entropy with the positive at index 0, and the logits.

    Shape:
        - q, k: :math:`(N, D)`; queue: :math:`(D, K)`; same_item: :math:`(N, K)` bool;
          logits: :math:`(N, 1 + K)`.
    """
    q, k, queue = q.float(), k.float(), queue.float()
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # N x 1
    l_neg = torch.einsum("nc,ck->nk", q, queue)  # N x K
    if same_item is not None:
        l_neg = l_neg.masked_fill(same_item, float("-inf"))
    logits = torch.cat([l_pos, l_neg], dim=1) / T  # N x (1+K)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # N
    return F.cross_entropy(logits, labels), logits


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The Kozachenko-Leonenko entropy regulariser (Sablayrolles et al. 2019; SSCD, DINOv2):
    ``-mean(log(distance to the nearest other embedding))``; minimising it spreads a batch apart.

    Args:
        x: L2-normalised embeddings.

    Shape:
        - x: :math:`(N, D)` with N >= 2; output: scalar.
    """
    x = x.float()
    with torch.no_grad():
        similarity = x @ x.T  # N x N
        similarity.fill_diagonal_(-2.0)  # never one's own neighbour
        nearest = similarity.argmax(dim=1)  # N
    return -torch.log((x - x[nearest]).norm(dim=1) + eps).mean()


def momentum_at(step: int, total_steps: int, m: float, schedule: str = "constant") -> float:
    """The key encoder's momentum at ``step``: constant ``m``, or BYOL's cosine ramp from ``m`` to 1."""
    if schedule not in MOMENTUM_SCHEDULES:
        raise ValueError(f"momentum schedule must be one of {MOMENTUM_SCHEDULES}, got {schedule!r}")
    if schedule == "constant" or total_steps <= 0:
        return m
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - m) * (math.cos(math.pi * progress) + 1.0) / 2.0


def resolve_queue_size(K: int, *, num_samples: int | None, global_batch: int) -> tuple[int, str | None]:
    """Check the queue length against the dataset and adapt it when the dataset is too small.

    A queue longer than the dataset holds stale keys of the very images in the current batch,
    i.e. false negatives; the queue is therefore cut to a multiple of the global batch that
    leaves at least one batch of the dataset out of it.

    Args:
        K: the requested queue length.
        num_samples: samples in the training set (None when unknown: no adaptation).
        global_batch: keys enqueued per step (batch per rank times world size).

    Returns:
        The queue length to use and, when it changed, a message saying why.

    Raises:
        ValueError: if ``K`` is not positive or the dataset cannot feed any queue.
    """
    if K < 1:
        raise ValueError(f"queue size K must be >= 1, got {K}")
    if num_samples is None or K + global_batch <= num_samples:
        if K < global_batch:
            raise ValueError(f"queue size K={K} is smaller than the global batch {global_batch}: "
                             f"one step's keys would not fit; use K >= {global_batch}")
        return K, None
    largest = (num_samples // global_batch - 1) * global_batch
    if largest < global_batch:
        raise ValueError(f"the dataset of {num_samples} samples is too small for a MoCo queue with a "
                         f"global batch of {global_batch}: it needs at least {2 * global_batch} "
                         f"samples; lower --batch-size or add data")
    return largest, (f"queue size K={K} is not smaller than the dataset ({num_samples} samples) "
                     f"minus one global batch ({global_batch}); using K={largest}")


class MoCo(nn.Module):
    """Momentum contrast with a queue (v2) or with in-batch negatives and a predictor (v3).

    Args:
        model_name: any timm model name, created with ``pretrained=False, num_classes=0``.
        dim: the embedding size of the projection head.
        hidden_dim: the hidden size of the projection (and v3 predictor) MLP.
        K: queue length (v2 only; v3 uses the other samples of the global batch).
        m: momentum of the key encoder (updated as ``m * key + (1 - m) * query``).
        momentum_schedule: ``"constant"`` keeps ``m``; ``"cosine"`` ramps it to 1 over the run
            (set by :meth:`on_step_end`, which the engine calls after every step).
        T: softmax temperature.
        version: ``"v2"`` or ``"v3"``.
        shuffle_bn: shuffle the key batch across ranks (v2). On one process, together with
            ``bn_splits > 1``, the shuffle moves keys into other BN sub-batches.
        bn_splits: sub-batches per device normalised separately (split-batch/ghost BN); 1 off.
        seed: seeds the queue's initial content and the shuffle's generator.
        img_size: side of the training crops, for backbones built for one input size (ViTs).
        koleo_weight: weight of :func:`koleo` on the batch's queries, added to the loss (v2); 0 off.
        mask_same_item: leave the keys of a query's own ``item_id`` (its item's other photos, from
            the queue (v2) or the batch (v3)) out of its negatives; samples without an item_id
            keep every negative.

    Shape:
        - view_q, view_k: :math:`(N, 3, H, W)` normalised float.
    """

    def __init__(self, model_name: str, *, dim: int = 128, hidden_dim: int = 2048, K: int = 65536,
                 m: float = 0.999, T: float = 0.2, version: str = "v2", shuffle_bn: bool = True,
                 bn_splits: int = 1, seed: int = 0, img_size: int | None = None,
                 momentum_schedule: str = "constant", koleo_weight: float = 0.0,
                 mask_same_item: bool = False) -> None:
        super().__init__()
        if version not in VERSIONS:
            raise ValueError(f"MoCo version must be one of {VERSIONS}, got {version!r}")
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"momentum m must be in [0, 1], got {m}")
        if T <= 0:
            raise ValueError(f"temperature T must be > 0, got {T}")
        if bn_splits < 1:
            raise ValueError(f"bn_splits must be >= 1, got {bn_splits}")
        if momentum_schedule not in MOMENTUM_SCHEDULES:
            raise ValueError(f"momentum schedule must be one of {MOMENTUM_SCHEDULES}, got {momentum_schedule!r}")
        if koleo_weight < 0:
            raise ValueError(f"koleo_weight must be >= 0, got {koleo_weight}")
        self.model_name, self.version, self.koleo_weight = model_name, version, koleo_weight
        self.mask_same_item = mask_same_item
        self.K, self.m, self.T = K, m, T
        self.momentum_schedule = momentum_schedule
        self.m_now = m  # the momentum of the next step (the schedule's value, see on_step_end)
        self.shuffle_bn = shuffle_bn and version == "v2"
        v3 = version == "v3"
        self.encoder_q = Encoder(model_name, dim=dim, hidden_dim=hidden_dim,
                                 head_layers=3 if v3 else 2, head_batch_norm=v3, img_size=img_size)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for param in self.encoder_k.parameters():
            param.requires_grad = False
        self.predictor = projection_mlp(dim, hidden_dim, dim, layers=2, batch_norm=True) if v3 else None
        # Ghost BN only helps where there is batch norm (not in a ViT, say).
        self.bn_splits = bn_splits if has_batch_norm(self.encoder_q.backbone) else 1
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        if not v3:
            if K < 1:
                raise ValueError(f"queue size K must be >= 1, got {K}")
            queue_generator = torch.Generator().manual_seed(seed)
            self.register_buffer("queue", F.normalize(torch.randn(dim, K, generator=queue_generator), dim=0))  # D x K
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
            # The item code of each queued key (NO_ITEM: none), for mask_same_item.
            self.register_buffer("queue_items", torch.full((K,), NO_ITEM, dtype=torch.long))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A checkpoint from before queue_items: its queued keys have no known item.
        if hasattr(self, "queue_items") and prefix + "queue_items" not in state_dict:
            state_dict[prefix + "queue_items"] = torch.full_like(self.queue_items, NO_ITEM)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    backbone_prefix = "encoder_q.backbone."

    @property
    def backbone(self) -> nn.Module:
        """The query encoder's backbone: what is exported and evaluated."""
        return self.encoder_q.backbone

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        """Set the momentum of the next step from the schedule; it is logged as ``m``."""
        self.m_now = momentum_at(step, total_steps, self.m, self.momentum_schedule)
        return {"m": self.m_now}

    def load_backbone(self, weights: dict[str, torch.Tensor]) -> None:
        """Start the query backbone from ``weights`` (strict) and the key encoder as its copy."""
        self.encoder_q.backbone.load_state_dict(weights)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())

    def generators(self) -> dict[str, torch.Generator]:
        """The shuffle-BN generator (checkpointed so a resumed run shuffles as an unbroken one)."""
        return {"shuffle": self.shuffle_generator}

    def encoders(self) -> list[nn.Module]:
        return [self.encoder_q, self.encoder_k]

    def summary(self) -> dict[str, Any]:
        """The queue's pointer and checksum (v2), so a resume can be checked against the run."""
        if self.version == "v3":
            return {"queue_ptr": None, "queue_sum": None}
        return {"queue_ptr": int(self.queue_ptr), "queue_sum": float(self.queue.double().sum())}

    @torch.no_grad()
    def health(self) -> dict[str, float]:
        """``key_cos``: the mean cosine between two different queued keys (v2; v3 has no queue).

        About 0 when the keys spread over the sphere, 1 when they have collapsed onto one direction.
        A rising value explains a falling instance accuracy: every negative then sits close to
        every query. Computed from the keys' sum, so it costs one pass over the queue.
        """
        K = self.queue.shape[1] if self.version == "v2" else 0
        if K < 2:
            return {}
        total = self.queue.float().sum(dim=1)  # D
        return {"key_cos": float((total.dot(total) - K) / (K * (K - 1)))}

    @torch.no_grad()
    def momentum_update(self, m: float | None = None) -> None:
        """key = m * key + (1 - m) * query, for every parameter of the key encoder."""
        m = self.m_now if m is None else m
        key_params = list(self.encoder_k.parameters())
        query_params = [param.detach() for param in self.encoder_q.parameters()]
        torch._foreach_lerp_(key_params, query_params, 1.0 - m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor, items: torch.Tensor | None = None) -> None:
        """Replace the oldest ``len(keys)`` entries of the queue by ``keys`` (all ranks' keys).

        Args:
            items: the keys' item codes (:func:`ecomaug.listing_views.item_codes`); None: unknown.

        Shape:
            - keys: :math:`(B, D)` with ``B <= K``; items: :math:`(B,)` int64.
        """
        batch_size = keys.shape[0]
        if batch_size > self.K:
            raise ValueError(f"{batch_size} keys do not fit into a queue of K={self.K}")
        ptr = int(self.queue_ptr)
        positions = (ptr + torch.arange(batch_size, device=self.queue.device)) % self.K  # B
        self.queue[:, positions] = keys.to(self.queue.dtype).T  # D x B
        self.queue_items[positions] = NO_ITEM if items is None else items.to(self.queue_items.device)
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    def forward(self, view_q: torch.Tensor, view_k: torch.Tensor, *, m: float | None = None,
                meta: Sequence[dict[str, Any]] | None = None) -> ContrastiveOutput:
        """One MoCo step's loss; updates the key encoder (momentum) and the queue as it goes.

        Args:
            view_q: the query view of the images.
            view_k: the key view of the same images.
            m: the momentum of this step; default: :attr:`m_now` (the schedule's).
            meta: each sample's metadata; only ``item_id`` is read, and only with ``mask_same_item``
                (MoCo needs no labels).
        """
        items = item_codes(meta, view_q.shape[0], view_q.device) if self.mask_same_item else None
        if self.version == "v3":
            return self._forward_v3(view_q, view_k, m=m, items=items)
        q = F.normalize(encode_in_splits(self.encoder_q, view_q, self.bn_splits), dim=1)  # N x D
        with torch.no_grad():
            self.momentum_update(m)
            if self.shuffle_bn:
                view_k, idx_unshuffle = batch_shuffle(view_k, generator=self.shuffle_generator)
            k = F.normalize(encode_in_splits(self.encoder_k, view_k, self.bn_splits), dim=1)  # N x D
            if self.shuffle_bn:
                k = batch_unshuffle(k, idx_unshuffle)
        same_item = None
        if items is not None:
            same_item = item_matches(items, self.queue_items)  # N x K
        loss, logits = info_nce(q, k, self.queue.clone().detach(), self.T, same_item)
        if self.koleo_weight > 0 and q.shape[0] > 1:
            loss = loss + self.koleo_weight * koleo(q)
        self.dequeue_and_enqueue(concat_all_gather(k), None if items is None else concat_all_gather(items))
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == 0).float().mean()
        return ContrastiveOutput(loss=loss, accuracy=accuracy)

    def _contrast_v3(self, q: torch.Tensor, k: torch.Tensor,
                     items: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MoCo v3's loss: the other keys of the global batch are the negatives (less the query's
        own item's other photos, given ``items``)."""
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        k_all = concat_all_gather(k)  # W*N x D
        logits = q @ k_all.T / self.T  # N x W*N
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * get_rank()  # N
        if items is not None:
            items_all = concat_all_gather(items)  # W*N
            same = item_matches(items, items_all)  # N x W*N
            same[torch.arange(q.shape[0], device=q.device), labels] = False  # the positive stays
            logits = logits.masked_fill(same, float("-inf"))
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return F.cross_entropy(logits, labels) * 2 * self.T, accuracy

    def _forward_v3(self, view_1: torch.Tensor, view_2: torch.Tensor, *, m: float | None,
                    items: torch.Tensor | None = None) -> ContrastiveOutput:
        q1 = self.predictor(encode_in_splits(self.encoder_q, view_1, self.bn_splits))  # N x D
        q2 = self.predictor(encode_in_splits(self.encoder_q, view_2, self.bn_splits))  # N x D
        with torch.no_grad():
            self.momentum_update(m)
            k1 = encode_in_splits(self.encoder_k, view_1, self.bn_splits)  # N x D
            k2 = encode_in_splits(self.encoder_k, view_2, self.bn_splits)  # N x D
        loss_12, accuracy_12 = self._contrast_v3(q1, k2, items)
        loss_21, accuracy_21 = self._contrast_v3(q2, k1, items)
        return ContrastiveOutput(loss=loss_12 + loss_21, accuracy=(accuracy_12 + accuracy_21).detach() / 2)
