"""Logging for every command: ``--log-level``, messages that keep the progress bar whole, repeats once.

The backend choice, the shard check and the MoCo queue cut are logged at INFO; ``--log-level
info`` shows them. Records go through ``tqdm.write`` so a message never breaks the progress bar's
line, Python warnings are routed into logging too, and a message that repeats (the same text
from the same place) is said once; :func:`report_repeats` says how often it came.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter

LEVELS = ("debug", "info", "warning", "error")
_HANDLER_NAME = "ecomaug"


class TqdmHandler(logging.Handler):
    """Write records with ``tqdm.write``, which clears and redraws any open progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a logging handler must never raise into the code that logs
            self.handleError(record)


class SayOnce(logging.Filter):
    """Let the first record of each (logger, message) through; count the repeats."""

    def __init__(self) -> None:
        super().__init__()
        self.repeats: Counter[tuple[str, int, str]] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        seen = key in self.repeats
        self.repeats[key] += 1
        return not seen


def configure_logging(level: str = "warning") -> None:
    """Send the ``ecomaug``/``loaders``/``bench`` loggers and Python warnings to stderr at ``level``.

    Idempotent: a second call changes the level and keeps one handler, and starts the count of
    repeats afresh, so a command reports only its own repeats (not those of earlier work in the
    same process).

    Raises:
        ValueError: ``level`` is not one of :data:`LEVELS`.
    """
    if str(level).lower() not in LEVELS:
        raise ValueError(f"--log-level must be one of {list(LEVELS)}, got {level!r}")
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = TqdmHandler()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        handler.addFilter(SayOnce())
        root.addHandler(handler)
    for flt in handler.filters:
        if isinstance(flt, SayOnce):
            flt.repeats.clear()
    numeric = getattr(logging, str(level).upper())
    handler.setLevel(numeric)
    for name in ("ecomaug", "loaders", "bench", "py.warnings"):
        logging.getLogger(name).setLevel(numeric)
    logging.captureWarnings(True)


def report_repeats() -> None:
    """Say, once each, how many times a repeated message came (call at the end of a command)."""
    root = logging.getLogger()
    for handler in root.handlers:
        for flt in handler.filters if handler.get_name() == _HANDLER_NAME else []:
            if isinstance(flt, SayOnce):
                for (name, level, message), count in flt.repeats.items():
                    if count > 1:
                        handler.emit(logging.LogRecord(name, level, "", 0, f"said {count} times in all: {message}",
                                                       None, None))
                flt.repeats.clear()
