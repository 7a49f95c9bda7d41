"""The run directory: refuse to overwrite a run by accident, clear one on ``--overwrite``."""

from __future__ import annotations

from pathlib import Path

from ecomaug.checkpoint import CHECKPOINT_DIR, list_checkpoints
from ecomaug.config import TrainConfig
from ecomaug.export import EXPORT_FILES, WEIGHTS_NAME
from loaders.atomic import check_writable


def previous_run(run_dir: Path) -> list[str]:
    """What an earlier run left in ``run_dir``: checkpoints, metrics, TensorBoard logs, an export."""
    found = []
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s) up to step {checkpoints[0][0]}")
    if (run_dir / "metrics.jsonl").is_file():
        found.append("metrics.jsonl")
    if any((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        found.append("tensorboard/")
    if (run_dir / "export" / WEIGHTS_NAME).is_file():
        found.append("export/")
    return found


def check_run_dir(config: TrainConfig) -> None:
    """Refuse an ``--out`` that holds a run unless ``--resume`` or ``--overwrite`` says what to do with it.

    Without this a rerun restarted at step 0, overwrote the checkpoints and appended a second run
    to the metrics; ``python train.py`` (``--out runs/sample``) is rerun often.

    Raises:
        NotADirectoryError: ``--out`` is a file, or a file is in its way.
        OSError: ``--out`` cannot be written (read-only file system: EROFS; PermissionError).
        FileExistsError: ``--out`` holds a run and neither flag was given.
    """
    run_dir = config.out_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(20, "--out is a file, not a directory", str(run_dir))
    check_writable(run_dir)  # now, not after the model is built
    found = previous_run(run_dir) if config.resume is None and not config.overwrite else []
    if found:
        raise FileExistsError(f"{run_dir} already holds a run ({', '.join(found)}): add --resume auto to "
                              f"continue it, or --overwrite to start again from step 0 (deletes its "
                              f"checkpoints, metrics, TensorBoard logs and export)")


def clear_run(run_dir: Path) -> None:
    """``--overwrite``: delete the files an earlier run wrote (only those; shards and other files stay)."""
    for _, path in list_checkpoints(run_dir):
        path.unlink(missing_ok=True)
    for path in [*(run_dir / CHECKPOINT_DIR).glob(".ckpt-*.tmp"),
                 *(run_dir / "tensorboard").glob("events.out.tfevents.*"),
                 run_dir / "metrics.jsonl", *(run_dir / "export" / name for name in EXPORT_FILES)]:
        path.unlink(missing_ok=True)
