"""Helpers for one process or many: gathering across ranks, MoCo's shuffle BN, the weights' fingerprint.

Every function works without ``torch.distributed`` being initialised (one process is "world
size 1"), so the model code reads the same on a laptop and under ``torchrun``.

Shuffle BN (MoCo, He et al. 2020, section 3.3): batch-norm statistics computed over the same
samples for a query and its positive key let the model "cheat" by recognising its batch. Under
DDP the key batch is shuffled across ranks, so each rank's key encoder normalises a different
random subset. On a single device there are no other ranks to shuffle with; the documented
alternative here is *split-batch* (ghost) BN: the batch is cut into ``splits`` sub-batches that
are normalised separately, emulating ``splits`` devices, and the key batch is shuffled before it
is cut (this is what the MoCo authors' single-GPU CIFAR demo does with ``SplitBatchNorm``).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group is initialised and holds more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, in rank order (no gradient).

    Every rank must pass the same shape (the loaders drop the last partial batch in training).

    Shape:
        - tensor: :math:`(N, *)`; returns :math:`(W N, *)` with ``W`` the world size.
    """
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle a batch across all ranks (or within the one device).

    Rank 0 draws the permutation from ``generator`` and broadcasts it, so ``generator`` only
    has to be meaningful on rank 0. The returned index undoes the shuffle in
    :func:`batch_unshuffle`.

    Args:
        x: this rank's batch.
        generator: a CPU ``torch.Generator``.

    Returns:
        This rank's slice of the shuffled global batch, and the index that restores order.

    Shape:
        - x: :math:`(N, *)`; returns :math:`(N, *)` and an index of shape :math:`(W N,)`.
    """
    batch_size = x.shape[0]
    x_all = concat_all_gather(x)  # W*N x ...
    total = x_all.shape[0]
    idx_shuffle = torch.randperm(total, generator=generator).to(x.device)  # W*N
    if is_distributed():
        dist.broadcast(idx_shuffle, src=0)
    idx_unshuffle = torch.argsort(idx_shuffle)  # W*N
    rank = get_rank()
    idx_this = idx_shuffle.view(-1, batch_size)[rank] if is_distributed() else idx_shuffle  # N
    return x_all[idx_this], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(y: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo :func:`batch_shuffle` on the encoder's outputs: this rank gets its own samples back.

    Shape:
        - y: :math:`(N, *)`, idx_unshuffle: :math:`(W N,)`; returns :math:`(N, *)`.
    """
    batch_size = y.shape[0]
    y_all = concat_all_gather(y)  # W*N x ...
    if not is_distributed():
        return y_all[idx_unshuffle]
    idx_this = idx_unshuffle.view(-1, batch_size)[get_rank()]  # N
    return y_all[idx_this]


def encode_in_splits(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     splits: int) -> torch.Tensor:
    """Run ``encoder`` on ``splits`` sub-batches so batch norm sees each one separately.

    With ``splits == 1`` this is ``encoder(x)``. Sub-batches follow dim 0, so a key batch that
    was shuffled first lands in sub-batches unrelated to its queries' ones.

    Shape:
        - x: :math:`(N, C, H, W)`; returns :math:`(N, D)`.
    """
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if splits == 1:
        return encoder(x)
    if x.shape[0] < splits:
        raise ValueError(f"batch of {x.shape[0]} cannot be cut into {splits} BN splits; "
                         f"use a batch of at least {splits} or fewer --bn-splits")
    return torch.cat([encoder(chunk) for chunk in x.chunk(splits)], dim=0)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (a copy; the identity on one process)."""
    value = value.detach().clone()
    if is_distributed():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def barrier() -> None:
    """Wait for every rank (nothing to wait for on one process)."""
    if is_distributed():
        dist.barrier()


def parameter_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: equal on all ranks when DDP kept them in step."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def gather(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order (a one-element list on one process)."""
    if not is_distributed():
        return [value]
    values = [None] * get_world_size()
    dist.all_gather_object(values, value)
    return values
