"""Training checkpoints: atomic writes, the last k kept, the newest valid one found on resume.

A checkpoint is ``RUN/checkpoints/ckpt-{step:08d}.pt``, a dict of tensors and plain Python
values only (RNG states as tensors, the config as a dict), so that it loads with
``torch.load(..., weights_only=True)`` and never runs pickled code.

Every file is written by :func:`write_atomic` (the export's too): a temporary file beside the
target, fsync, the permissions the umask allows, a rename. A full disk raises one
:class:`~ecomaug.evaluation.embed.DiskFullError` naming the file, removes the temporary file and
leaves the previous file as it was.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

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


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the fallback only)
    os.umask(mask)
    return mask


class _WholeWrites:
    """An unbuffered binary stream that writes all it is given and remembers the OSError that stopped it.

    ``torch.save`` reports a failed write as ``RuntimeError: [enforce fail at inline_container.cc]``;
    the error kept here says what really happened (a full disk, usually).
    """

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        written = 0
        try:
            while written < len(view):  # a raw write may stop short when the disk fills up
                written += self.stream.write(view[written:]) or 0
        except OSError as error:
            self.error = error
            raise
        return written

    def flush(self) -> None:
        self.stream.flush()


def stage_file(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a temporary file beside ``path`` with ``write(stream)``, fsync it, give it the umask's mode.

    The caller renames it over ``path`` (:func:`write_atomic` does both); staging several files
    first lets an export replace all of them or none.

    Returns:
        The temporary file (``.NAME.*.tmp`` in the same directory).

    Raises:
        DiskFullError: the disk (or quota) filled up; the temporary file is removed.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with open(handle, "wb", buffering=0) as raw:
            stream = _WholeWrites(raw)
            try:
                write(stream)
                os.fsync(raw.fileno())
            except Exception as error:
                cause = stream.error if stream.error is not None else error
                if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
                    from ecomaug.evaluation.embed import DiskFullError

                    raise DiskFullError(path) from error
                raise
        # mkstemp creates owner-only files; teammates on a shared filesystem need what the umask allows
        os.chmod(temporary, 0o666 & ~current_umask())
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return Path(temporary)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` so that readers see the old file or the new one, never half of one.

    Args:
        path: the file to (re)place; its directory must exist.
        write: writes the content to the binary stream it is given (``torch.save``, ``stream.write``).

    Returns:
        ``path``.

    Raises:
        DiskFullError: the disk filled up; no temporary file is left and the old file is intact.
    """
    path = Path(path)
    temporary = stage_file(path, write)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


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
