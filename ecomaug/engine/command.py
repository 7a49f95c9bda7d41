"""The command line of a run, shared by ``python train.py`` and ``ecomaug train``: parse, train, report."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Sequence

from ecomaug.config import parse_arguments
from ecomaug.engine.errors import NonFiniteLossError, OutOfMemoryError, TrainingAborted, TrainingInterrupted
from ecomaug.logs import configure_logging, report_repeats

if TYPE_CHECKING:
    from ecomaug.engine.trainer import TrainResult


def report(result: TrainResult) -> None:
    """Say where the outputs are, and the closing held-out recall (rank 0 only)."""
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"trained {result.step} steps; run directory: {result.run_dir}")
    print(f"checkpoint: {result.checkpoint}")
    if result.export_dir is not None:
        print(f"exported backbone: {result.export_dir} (backbone.safetensors, config.json)")
    if result.held_out is not None:
        held_out = result.held_out
        start = (f" vs the frozen start {held_out['start_recall@1']:.3f}"
                 if held_out.get("start_recall@1") is not None else "")
        error = f" ± {held_out['standard_error']:.3f} (standard error)" if "standard_error" in held_out else ""
        items = f" of {held_out['num_items']} items" if "num_items" in held_out else " of items"
        print(f"held-out kNN recall@1 on {held_out['num_queries']} images{items} not trained on: "
              f"trained {held_out['trained_recall@1']:.3f}{error}{start} vs random-init "
              f"{held_out['random_init_recall@1']:.3f} ({held_out['data']})")
        if held_out.get("warning"):
            print(held_out["warning"])


def run(argv: Sequence[str] | None = None, *, prog: str | None = None) -> TrainResult:
    """Parse ``argv`` (``--log-level`` included), train, and report where the outputs are.

    Raises:
        Whatever :func:`ecomaug.engine.train` raises; the process group is left either way.
    """
    config, options = parse_arguments(argv, prog=prog)
    configure_logging(options.log_level)
    # Only now, once the flags parsed: --help and a bad flag do not wait seconds for torch and timm.
    import torch.distributed as dist

    from ecomaug.engine.trainer import train

    try:
        result = train(config)
    finally:
        report_repeats()
        if dist.is_initialized():
            dist.destroy_process_group()
    report(result)
    return result


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """``python train.py``: errors become one line and exit code 2; SIGTERM/SIGINT exit 143/130."""
    from ecomaug.cli import INTERRUPTED_EXIT_CODE, INTERRUPTED_MESSAGE, USER_ERRORS, is_user_error, one_line

    try:
        run(argv, prog=prog)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (parsing, after the end): no traceback
        print(INTERRUPTED_MESSAGE, file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except TrainingInterrupted as stop:
        print(stop, file=sys.stderr)
        return stop.exit_code
    except TrainingAborted as abort:
        print(f"Error: {abort}", file=sys.stderr)
        return 128 + abort.signal_number
    except (*USER_ERRORS, OSError, NonFiniteLossError, OutOfMemoryError) as error:
        if not (is_user_error(error) or isinstance(error, (NonFiniteLossError, OutOfMemoryError))):
            raise
        print(f"Error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0
