"""``--help`` and argument errors answer at once: they import none of torch, timm, kornia, faiss,
DALI or OpenCV (seconds of import, issue 23), only click and the light option constants.

Each case runs in a subprocess under ``python -X importtime``, which lists every module imported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Modules whose import costs seconds; a package counts with everything under it.
HEAVY = ("torch", "timm", "kornia", "faiss", "nvidia.dali", "cv2")
COMMANDS = ("shard", "dewatermark", "preview", "train", "export", "embed", "eval", "match")
ECOMAUG = ("-m", "ecomaug")

HELP = [pytest.param((*ECOMAUG, "--help"), id="ecomaug"),
        pytest.param(("train.py", "--help"), id="train.py")]
HELP += [pytest.param((*ECOMAUG, command, "--help"), id=command) for command in COMMANDS]

# One bad invocation per entry point: a value of the wrong type, an unknown option or a missing one.
ERRORS = [
    pytest.param((*ECOMAUG, "--log-level", "loud", "shard"), id="ecomaug-bad-log-level"),
    pytest.param((*ECOMAUG, "no-such-command"), id="ecomaug-unknown-command"),
    pytest.param((*ECOMAUG, "shard", "--quality", "abc", "in", "out"), id="shard-bad-value"),
    pytest.param((*ECOMAUG, "dewatermark", "--dilate", "abc", "in", "out"), id="dewatermark-bad-value"),
    pytest.param((*ECOMAUG, "preview", "-n", "abc", "--out", "grid.png"), id="preview-bad-value"),
    pytest.param((*ECOMAUG, "train", "--batch-size", "abc"), id="train-bad-value"),
    pytest.param((*ECOMAUG, "export", "ckpt.pt"), id="export-missing-out"),
    pytest.param((*ECOMAUG, "embed", "--batch-size", "abc"), id="embed-bad-value"),
    pytest.param((*ECOMAUG, "eval", "--no-such-option"), id="eval-unknown-option"),
    pytest.param((*ECOMAUG, "match", "--top-k", "abc"), id="match-bad-value"),
    pytest.param(("train.py", "--batch-size", "abc"), id="train.py-bad-value"),
    pytest.param(("train.py", "--no-such-option"), id="train.py-unknown-option"),
]


def heavy_imports(argv: tuple[str, ...], tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``python -X importtime ARGV`` in ``tmp_path``; which of :data:`HEAVY` it imported."""
    command = [sys.executable, "-X", "importtime",
               *(str(REPO / part) if part == "train.py" else part for part in argv)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    imported = [line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:") and line.count("|") == 2]
    heavy = [top for top in HEAVY if any(name == top or name.startswith(f"{top}.") for name in imported)]
    return done, heavy


@pytest.mark.parametrize("argv", HELP)
def test_help_imports_nothing_heavy(argv, tmp_path):
    done, heavy = heavy_imports(argv, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage:" in done.stdout or "usage:" in done.stdout
    assert not heavy, f"{' '.join(argv)} imported {heavy}"


@pytest.mark.parametrize("argv", ERRORS)
def test_argument_error_imports_nothing_heavy(argv, tmp_path):
    done, heavy = heavy_imports(argv, tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    assert not heavy, f"{' '.join(argv)} imported {heavy}"
