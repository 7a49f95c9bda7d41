"""Held-out item-matching recall@1 during and at the end of training (the kNN monitor)."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from typing import Any, Sequence

import torch

from ecomaug.config import TrainConfig
from ecomaug.listing_views import item_id_of
from ecomaug.normalise import Normalise


@torch.no_grad()
def knn_recall_at_1(backbone: torch.nn.Module, shards: str | os.PathLike, *, config: TrainConfig,
                    device: torch.device, normalise: Normalise, autocast: AbstractContextManager,
                    crop_size: int | None = None, extra_sizes: Sequence[int] = ()) -> dict[str, Any]:
    """Leave-one-out item-matching recall@1 of the backbone's pooled features on ``shards``, fed
    ``crop_size`` squares (default: the run's ``crop_size``), and ``extra_sizes`` as an export embeds
    (:func:`ecomaug.evaluation.models.pooled_descriptor`).

    Returns:
        ``recall@1``, its ``standard_error`` (:func:`ecomaug.evaluation.uncertainty.standard_error`),
        ``num_queries`` and ``num_items``.

    Raises:
        ValueError: fewer than 2 samples of ``shards`` carry an item_id.
    """
    from ecomaug.evaluation.models import pooled_descriptor
    from ecomaug.evaluation.retrieval import retrieval_metrics
    from ecomaug.evaluation.uncertainty import standard_error
    from loaders.build import build_loader

    loader = build_loader(shards, backend=config.backend, device=device, batch_size=config.batch_size,
                          crop_size=crop_size or config.crop_size, mode="eval", drop_last=False,
                          num_workers=config.num_workers)
    was_training = backbone.training
    backbone.eval()
    embeddings, items, keys = [], [], []
    try:
        for batch in loader:
            with autocast:
                features = pooled_descriptor(backbone, normalise(batch.views[0].float() / 255.0), extra_sizes)
            for index, sample in enumerate(batch.meta):
                if (item := item_id_of(sample)) is not None:
                    embeddings.append(features[index].float())
                    items.append(item)
                    keys.append(batch.keys[index])
    finally:
        backbone.train(was_training)
    if len(embeddings) < 2:
        raise ValueError(f"--val-data {shards} has fewer than 2 samples with an item_id")
    stacked = torch.stack(embeddings)  # M x F
    summary = retrieval_metrics(stacked, items, stacked, items, ks=(1,), exclude_same_key=True,
                                query_keys=keys, gallery_keys=keys, compute_map=False)
    recall, num_queries = float(summary["recall@1"]), int(summary["num_queries"])
    return {"recall@1": recall, "standard_error": standard_error(recall, num_queries), "num_queries": num_queries,
            "num_items": len(set(items))}


def closing_recall(backbone: torch.nn.Module, shards: str | os.PathLike, *, config: TrainConfig,
                   device: torch.device, normalise: Normalise, autocast: AbstractContextManager,
                   start_weights: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The run's closing evidence, at the export's input size: held-out kNN recall@1 of the trained backbone, of
    the weights it started from (``start_weights``, frozen: what fine-tuning must beat) and of a random-init one of
    the same architecture and input size (seeded with ``config.seed``), the trained recall's standard
    error, and a ``warning`` line when the set is too small to separate them (else None)."""
    from ecomaug.evaluation.uncertainty import held_out_warning
    from ecomaug.export import create_backbone, export_sides

    size, extra = export_sides(config.crop_size, config.export_size, config.export_multiscale)  # as the export

    def recall_of(weights: dict[str, torch.Tensor] | None) -> float:
        with torch.random.fork_rng(devices=[]):  # the caller's generator stream stays untouched
            torch.manual_seed(config.seed)
            baseline = create_backbone(config.model, img_size=config.crop_size)
        if weights is not None:
            baseline.load_state_dict(weights)
        baseline = baseline.to(device)
        if config.channels_last:
            baseline = baseline.to(memory_format=torch.channels_last)
        return knn_recall_at_1(baseline, shards, config=config, device=device, normalise=normalise,
                               autocast=autocast, crop_size=size, extra_sizes=extra)["recall@1"]

    trained = knn_recall_at_1(backbone, shards, config=config, device=device, normalise=normalise,
                              autocast=autocast, crop_size=size, extra_sizes=extra)
    result = {"trained_recall@1": trained["recall@1"], "standard_error": trained["standard_error"],
              "random_init_recall@1": recall_of(None), "num_queries": trained["num_queries"],
              "num_items": trained["num_items"], "data": str(shards)}
    if start_weights is not None:
        result["start_recall@1"] = recall_of(start_weights)
    result["warning"] = held_out_warning(
        trained["recall@1"], {"random-init": result["random_init_recall@1"], "the frozen start":
                              result.get("start_recall@1")},
        num_queries=trained["num_queries"], num_items=trained["num_items"])
    return result
