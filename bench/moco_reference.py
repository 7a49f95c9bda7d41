"""Our MoCo against a reference built from lightly's MoCo pieces, on identical data, views and init.

The reference is lightly's own recipe for MoCo v2 (``MoCoProjectionHead``, ``update_momentum``,
``NTXentLoss(memory_bank_size=(K, D))``, a ``deepcopy`` momentum encoder), started from our
model's weights and queue. Both see the very same two views of every batch (drawn once by the
recipe) and take the same SGD steps, so any gap is a difference in the objective's code:

* ``exact``: ours with ``shuffle_bn=False, bn_splits=1`` (what lightly does on one device);
  the losses must agree step for step up to float rounding (``tests/test_moco_reference.py``).
* ``ours``: ours as ``train.py`` runs it on one device (shuffle BN across 4 ghost-BN splits,
  which lightly's example leaves out): the curves may differ, and held-out recall says whether
  the difference matters.

    python -m bench.moco_reference --data SHARDS --val-data EVAL_SHARDS --steps 300 --out reports/moco-ref
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from bench.harness import BenchCommand
from ecomaug.moco import MoCo


class LightlyMoCo(nn.Module):
    """MoCo v2 exactly as lightly's example builds it, around a timm backbone.

    Shape:
        - views: :math:`(N, 3, H, W)` normalised float.
    """

    def __init__(self, backbone: nn.Module, *, hidden_dim: int, dim: int, K: int, T: float) -> None:
        super().__init__()
        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(backbone.num_features, hidden_dim, dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(temperature=T, memory_bank_size=(K, dim))

    @classmethod
    def from_moco(cls, moco: MoCo) -> "LightlyMoCo":
        """A reference that starts from ``moco``'s weights (both encoders) and its queue."""
        head = moco.encoder_q.head
        reference = cls(copy.deepcopy(moco.encoder_q.backbone), hidden_dim=head[0].out_features,
                        dim=head[-1].out_features, K=moco.K, T=moco.T)
        reference.backbone_momentum.load_state_dict(moco.encoder_k.backbone.state_dict())
        for ours, theirs in ((moco.encoder_q.head, reference.projection_head),
                             (moco.encoder_k.head, reference.projection_head_momentum)):
            values = list(ours.state_dict().values())
            names = list(theirs.state_dict())
            if len(values) != len(names):
                raise ValueError(f"projection heads differ: {len(values)} vs {len(names)} tensors")
            theirs.load_state_dict(dict(zip(names, values)))
        with torch.no_grad():
            reference.criterion.memory_bank.bank.copy_(moco.queue.T)  # lightly keeps K x D
            reference.criterion.memory_bank.bank_ptr.copy_(moco.queue_ptr)
        return reference

    def step(self, view_q: torch.Tensor, view_k: torch.Tensor, *, m: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Lightly's MoCo training step (before the optimizer): the loss, and the instance accuracy."""
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)
        query = self.projection_head(self.backbone(view_q))  # N x D
        with torch.no_grad():
            key = self.projection_head_momentum(self.backbone_momentum(view_k))  # N x D
            bank = self.criterion.memory_bank.bank.clone()  # K x D, before this step's enqueue
        loss = self.criterion(query, key)
        with torch.no_grad():
            q, k = nn.functional.normalize(query, dim=1), nn.functional.normalize(key, dim=1)
            positive = (q * k).sum(dim=1)  # N
            accuracy = (positive > (q @ bank.T).max(dim=1).values).float().mean()
        return loss, accuracy


def _sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                           weight_decay=1e-4)


@torch.no_grad()
def _knn_recall(backbone: nn.Module, val_data: str, crop_size: int, normalise: nn.Module) -> float:
    from ecomaug.evaluation.retrieval import retrieval_metrics
    from loaders.build import build_loader

    was_training = backbone.training
    backbone.eval()
    features, items, keys = [], [], []
    for batch in build_loader(val_data, backend="torch", device=torch.device("cpu"), batch_size=64,
                              crop_size=crop_size, mode="eval", drop_last=False, num_workers=0):
        features.append(backbone(normalise(batch.views[0].float() / 255)))
        items += [str(meta["item_id"]) for meta in batch.meta]
        keys += list(batch.keys)
    backbone.train(was_training)
    stacked = torch.cat(features)
    summary = retrieval_metrics(stacked, items, stacked, items, ks=(1,), exclude_same_key=True,
                                query_keys=keys, gallery_keys=keys, compute_map=False)
    return float(summary["recall@1"])


def compare(data: str, val_data: str | None, *, steps: int, model_name: str = "resnet18", crop_size: int = 64,
            batch_size: int = 32, K: int = 1024, m: float = 0.99, T: float = 0.2, lr: float = 0.06,
            recipe: str = "mocov2", eval_every: int = 100, seed: int = 0) -> dict[str, Any]:
    """Train ``exact``, ``ours`` and the lightly reference side by side on identical views."""
    from ecomaug.recipes import build_recipe
    from loaders.build import build_loader
    from ecomaug.normalise import Normalise

    torch.manual_seed(seed)
    base = MoCo(model_name, dim=128, hidden_dim=512, K=K, m=m, T=T, shuffle_bn=False, bn_splits=1, seed=seed)
    models: dict[str, nn.Module] = {"reference": LightlyMoCo.from_moco(base), "exact": base,
                                    "ours": copy.deepcopy(base)}
    models["ours"].shuffle_bn, models["ours"].bn_splits = True, min(4, max(1, batch_size // 8))
    optimizers = {name: _sgd(model, lr) for name, model in models.items()}
    normalise = Normalise(channels_last=False)
    augment = build_recipe(recipe, generator=torch.Generator().manual_seed(seed))
    curves: dict[str, dict[str, list]] = {name: {"step": [], "loss": [], "accuracy": [], "recall_step": [],
                                                "recall@1": []} for name in models}
    step, epoch, started = 0, 0, time.perf_counter()
    while step < steps:
        for batch in build_loader(data, backend="torch", device=torch.device("cpu"), batch_size=batch_size,
                                  views=2, crop_size=crop_size, seed=seed, epoch=epoch, num_workers=0):
            views = [normalise(augment(view)) for view in batch.views]  # drawn once for all three
            for name, model in models.items():
                if name == "reference":
                    loss, accuracy = model.step(*views, m=m)
                else:
                    output = model(*views, m=m)
                    loss, accuracy = output.loss, output.accuracy
                optimizers[name].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[name].step()
                curves[name]["step"].append(step + 1)
                curves[name]["loss"].append(float(loss.detach()))
                curves[name]["accuracy"].append(float(accuracy))
            step += 1
            if val_data and (step % eval_every == 0 or step == steps):
                for name, model in models.items():
                    curves[name]["recall_step"].append(step)
                    curves[name]["recall@1"].append(_knn_recall(model.backbone, val_data, crop_size, normalise))
            if step >= steps:
                break
        epoch += 1
    gap = max(abs(a - b) for a, b in zip(curves["exact"]["loss"], curves["reference"]["loss"]))
    return {"settings": dict(data=data, val_data=val_data, steps=steps, model=model_name, crop_size=crop_size,
                             batch_size=batch_size, K=K, m=m, T=T, lr=lr, recipe=recipe, seed=seed),
            "curves": curves, "max_loss_gap_exact_vs_reference": gap,
            "seconds": round(time.perf_counter() - started, 1)}


def _smooth(values: list[float], width: int = 10) -> list[float]:
    return [sum(values[max(0, i - width + 1):i + 1]) / len(values[max(0, i - width + 1):i + 1])
            for i in range(len(values))]


def plot(result: dict[str, Any], path: Path) -> Path:
    """Loss, accuracy and held-out recall@1 of the three, overlaid."""
    from bench.curves import plot_training_curves

    styles = {"reference": dict(color="black", lw=2.5, alpha=0.5), "exact": dict(color="tab:orange", ls="--"),
              "ours": dict(color="tab:blue")}
    runs = {name: {"loss": (curve["step"], _smooth(curve["loss"])),
                   "accuracy": (curve["step"], _smooth(curve["accuracy"])),
                   "recall": (curve["recall_step"], curve["recall@1"])}
            for name, curve in result["curves"].items()}
    return plot_training_curves(runs, path, styles=styles, titles=(
        "InfoNCE loss (10-step mean)", "instance accuracy", "held-out kNN recall@1"))


@click.command("moco-reference", cls=BenchCommand)
@click.option("--data", required=True, help="Training shards.")
@click.option("--val-data", default=None, help="Held-out shards with item_id for kNN recall@1.")
@click.option("--steps", type=int, default=300, show_default=True)
@click.option("--model", "model_name", default="resnet18", show_default=True)
@click.option("--crop-size", type=int, default=64, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--queue-size", type=int, default=1024, show_default=True)
@click.option("--momentum", type=float, default=0.99, show_default=True)
@click.option("--temperature", type=float, default=0.2, show_default=True)
@click.option("--lr", type=float, default=0.06, show_default=True)
@click.option("--recipe", default="mocov2", show_default=True)
@click.option("--eval-every", type=int, default=100, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports/moco-reference"),
              show_default=True)
def main(data: str, val_data: str | None, steps: int, model_name: str, crop_size: int, batch_size: int,
         queue_size: int, momentum: float, temperature: float, lr: float, recipe: str, eval_every: int,
         out: Path) -> None:
    """Train our MoCo and lightly's side by side; write curves.png and result.json."""
    result = compare(data, val_data, steps=steps, model_name=model_name, crop_size=crop_size,
                     batch_size=batch_size, K=queue_size, m=momentum, T=temperature, lr=lr, recipe=recipe,
                     eval_every=eval_every)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "curves.png")
    for name, curve in result["curves"].items():
        recall = curve["recall@1"][-1] if curve["recall@1"] else float("nan")
        tail = curve["loss"][-20:]
        click.echo(f"{name:>9}: loss {curve['loss'][0]:.3f} -> {sum(tail) / len(tail):.3f}, "
                   f"accuracy(last 20) {sum(curve['accuracy'][-20:]) / 20:.2f}, recall@1 {recall:.3f}")
    click.echo(f"largest loss gap, exact vs reference: {result['max_loss_gap_exact_vs_reference']:.2e}")
    click.echo(f"{out / 'curves.png'}, {out / 'result.json'}")


if __name__ == "__main__":
    main()
