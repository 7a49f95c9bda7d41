"""Training checkpoints: atomic writes, the last k kept, the newest valid one found on resume.

A checkpoint is ``RUN/checkpoints/ckpt-{step:08d}.pt``, a dict of tensors and plain Python
values only (RNG states as tensors, the config as a dict), so that it loads with
``torch.load(..., weights_only=True)`` and never runs pickled code.

Every file is written by :func:`write_atomic` (the export's too): a temporary file beside the
target, fsync, the permissions the umask allows, a rename. A full disk raises one
:class:`~loaders.atomic.DiskFullError` naming the file, removes the temporary file and
leaves the previous file as it was.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from loaders.atomic import stage_file, write_atomic  # noqa: F401 -- the one atomic writer (lowest layer)

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"ckpt-{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Checkpoints in ``run_dir`` as ``(step, path)``, newest first (temporary files ignored)."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in directory.iterdir()
             if (match := _NAME.match(path.name))]
    return sorted(found, reverse=True)


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict[str, Any], *, keep_last: int = 3) -> Path:
    """Write ``state`` with :func:`write_atomic`, then keep only the last ``keep_last``.

    A crash while writing leaves at most a ``.ckpt-*.tmp`` file, which is never mistaken for a
    checkpoint and is removed by the next save. Files get the mode the umask allows (0644 under
    umask 022), not mkstemp's 0600.

    Returns:
        The checkpoint's path.

    Raises:
        DiskFullError: the disk filled up; the earlier checkpoints are kept as they were.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda stream: torch.save(state, stream))
    for stale in path.parent.glob(".ckpt-*.tmp"):
        stale.unlink(missing_ok=True)
    for _, old in list_checkpoints(run_dir)[keep_last:]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a readable checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such checkpoint", str(path))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated or foreign file: torch raises several types
        raise ValueError(f"{path} is not a readable checkpoint: {str(error).splitlines()[0]}") from error
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ValueError(f"{path} is not an ecomaug training checkpoint (no 'model'/'step')")
    return state


def find_latest_checkpoint(run_dir: str | os.PathLike, *, map_location: str | torch.device = "cpu"
                           ) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``run_dir`` that loads, with its state; None when there is none.

    A corrupt newest file (a disk that filled up, say) falls back to the one before it.
    """
    for _, path in list_checkpoints(run_dir):
        try:
            return path, load_checkpoint(path, map_location=map_location)
        except ValueError:
            continue
    return None


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The process's torch RNG states (CPU, CUDA) and named generators, as tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, generator in (generators or {}).items():
        state[name] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where the device count matches)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([item.cpu() for item in cuda_states])
    for name, generator in (generators or {}).items():
        if name in state:
            generator.set_state(state[name].cpu())
