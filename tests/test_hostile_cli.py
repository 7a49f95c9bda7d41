"""Hostile input to ``train.py`` and every ``ecomaug`` command, each in a subprocess.

Every case must end with exit code 0 or 2; a failure is one ``Error: ...`` line on stderr with
no traceback; and nothing may be written outside the command's output path (a failed command
creates not even that). The working directory, HOME and TMPDIR live in a sandbox that is
compared file by file before and after; only the caches (``ECOMAUG_CACHE_DIR``, matplotlib's)
may change.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN = ("python", str(REPO / "train.py"))
ECOMAUG = ("python", "-m", "ecomaug")
TINY = ("--model", "test_resnet", "--crop-size", "32", "--batch-size", "8", "--queue-size", "32",
        "--backend", "torch", "--num-workers", "0", "--hidden-dim", "64", "--dim", "32",
        "--no-channels-last", "--no-progress", "--no-export")


@dataclass(frozen=True)
class Case:
    """A command line ({tar}, {shards}, {out}... are filled in), its exit code and what its error says."""

    name: str
    argv: tuple[str, ...]
    code: int = 2
    says: str = ""
    needs_no_cuda: bool = False


CASES = [
    # train.py: flags
    Case("train-bad-int", (*TRAIN, "--out", "{out}", "--batch-size", "abc"), says="expected int, got 'abc'"),
    Case("train-unknown-flag", (*TRAIN, "--out", "{out}", "--bogus-flag"), says="unrecognized arguments"),
    Case("train-overwrite-and-resume", (*TRAIN, "--out", "{out}", "--overwrite", "--resume", "auto"),
         says="contradict"),
    Case("train-help", (*TRAIN, "--help"), code=0),
    # train.py: devices
    Case("train-device-bogus", (*TRAIN, "--data", "{tar}", "--out", "{out}", *TINY, "--device", "bogus"),
         says="unknown device 'bogus'"),
    Case("train-device-cuda", (*TRAIN, "--data", "{tar}", "--out", "{out}", *TINY, "--device", "cuda"),
         says="CUDA is not available", needs_no_cuda=True),
    # train.py: paths, all checked before any work
    Case("train-data-missing", (*TRAIN, "--data", "{missing}", "--out", "{out}", *TINY), says="No such file"),
    Case("train-data-empty-dir", (*TRAIN, "--data", "{empty}", "--out", "{out}", *TINY), says="no manifest.json"),
    Case("train-val-data-missing", (*TRAIN, "--data", "{tar}", "--val-data", "{missing}", "--out", "{out}", *TINY),
         says="No such file"),
    Case("train-resume-garbage", (*TRAIN, "--data", "{tar}", "--out", "{out}", *TINY, "--resume", "{garbage}"),
         says="not a readable checkpoint"),
    Case("train-out-is-a-file", (*TRAIN, "--data", "{tar}", "--out", "{text}", *TINY), says="not a directory"),
    Case("train-model-unknown", (*TRAIN, "--data", "{tar}", "--out", "{out}", *TINY, "--model", "resnet5000"),
         says="unknown timm model 'resnet5000'"),
    Case("train-batch-larger-than-data", (*TRAIN, "--data", "{tar}", "--out", "{out}", *TINY, "--batch-size", "4096"),
         says="fewer than batch_size=4096"),
    # ecomaug train: the same entry, the same one line
    Case("ecomaug-train-bad-int", (*ECOMAUG, "train", "--out", "{out}", "--epochs", "many"), says="expected int"),
    Case("ecomaug-train-device", (*ECOMAUG, "train", "--data", "{tar}", "--out", "{out}", *TINY, "--device", "gpu"),
         says="unknown device 'gpu'"),
    # ecomaug preview
    Case("preview-device-bogus", (*ECOMAUG, "preview", "--shards", "{tar}", "--out", "{png}", "--device", "bogus"),
         says="unknown device 'bogus'"),
    Case("preview-device-cuda", (*ECOMAUG, "preview", "--shards", "{tar}", "--out", "{png}", "--device", "cuda"),
         says="CUDA is not available", needs_no_cuda=True),
    Case("preview-shards-missing", (*ECOMAUG, "preview", "--shards", "{missing}", "--out", "{png}"),
         says="No such file"),
    Case("preview-bad-set", (*ECOMAUG, "preview", "--shards", "{tar}", "--out", "{png}", "--set", "novalue"),
         says="NAME=VALUE"),
    # ecomaug eval
    Case("eval-group-by-unknown", (*ECOMAUG, "eval", "--gallery", "{shards}", "--random-init", "test_resnet",
                                   "--input-size", "32", "--out", "{out}", "--max-items", "4", "--disturbance",
                                   "clean", "--no-progress", "--group-by", "nope"),
         says="--group-by nope: no such column in the queries' metadata; the columns are "),
    Case("eval-gallery-missing", (*ECOMAUG, "eval", "--gallery", "{missing}", "--random-init", "test_resnet",
                                  "--out", "{out}"), says="No such file"),
    Case("eval-model-missing", (*ECOMAUG, "eval", "--gallery", "{shards}", "--model", "{missing}", "--out", "{out}"),
         says="No such model"),
    Case("eval-device-bogus", (*ECOMAUG, "eval", "--gallery", "{shards}", "--random-init", "test_resnet",
                               "--out", "{out}", "--device", "bogus"), says="unknown device"),
    Case("eval-random-init-unknown", (*ECOMAUG, "eval", "--gallery", "{shards}", "--random-init", "resnet5000",
                                      "--out", "{out}", "--max-items", "4", "--no-progress"),
         says="unknown timm model"),
    # ecomaug export
    Case("export-checkpoint-garbage", (*ECOMAUG, "export", "{garbage}", "--out", "{out}"),
         says="not a readable checkpoint"),
    Case("export-not-a-training-checkpoint", (*ECOMAUG, "export", "{foreign}", "--out", "{out}"),
         says="not an ecomaug training checkpoint"),
    Case("export-out-is-a-file", (*ECOMAUG, "export", "{checkpoint}", "--out", "{text}"), says="not a directory"),
    Case("export-ok", (*ECOMAUG, "export", "{checkpoint}", "--out", "{out}"), code=0),
    # ecomaug shard, embed, match, dewatermark; python -m bench
    Case("shard-input-missing", (*ECOMAUG, "shard", "{missing}", "{out}"), says="No such file"),
    Case("shard-input-text", (*ECOMAUG, "shard", "{text}", "{out}"), says="INPUT must be a folder or a manifest"),
    Case("embed-data-text", (*ECOMAUG, "embed", "--model", "{checkpoint}", "--data", "{text}", "--out", "{out}.npz"),
         says="not shards"),
    Case("embed-random-bytes-tar", (*ECOMAUG, "embed", "--model", "{checkpoint}", "--data", "{garbage_tar}",
                                    "--out", "{out}.npz", "--no-progress"), says="garbage.tar"),
    Case("match-a-missing", (*ECOMAUG, "match", "--a", "{missing}", "--b", "{tar}", "--model", "{checkpoint}",
                             "--out", "{out}"), says="No such catalogue"),
    Case("match-a-catalogue-with-itself", (*ECOMAUG, "match", "--a", "{tar}", "--b", "{tar}", "--model",
                                           "{checkpoint}", "--out", "{out}"), code=0),
    Case("dewatermark-marks-missing", (*ECOMAUG, "dewatermark", "{shards}", "{out}", "--marks", "{missing}"),
         says="No such watermark directory"),
    Case("bench-shards-missing", ("python", "-m", "bench", "pipeline", "--shards", "{missing}", "--device", "cpu"),
         says="No such file"),
]


def snapshot(root: Path, *, skip: tuple[Path, ...]) -> dict[str, tuple[int, int]]:
    """Every file (size, mtime) and folder (existence: creating ``out`` touches its parent) under ``root``."""
    found = {}
    for folder, folders, files in os.walk(root):
        folders[:] = [name for name in folders if Path(folder, name) not in skip]
        for name in [*folders, *files]:
            path = Path(folder, name)
            if path in skip:
                continue
            stat = path.lstat()
            found[str(path.relative_to(root))] = (0, 0) if path.is_dir() else (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def sandbox(sample_shards, tmp_path_factory) -> dict[str, Path]:
    """Inputs made once: a tar, an empty folder, a text file, garbage, a foreign and a real checkpoint."""
    from ecomaug.checkpoint import save_checkpoint
    from ecomaug.export import create_backbone

    inputs = tmp_path_factory.mktemp("inputs")
    (inputs / "empty").mkdir()
    (inputs / "notes.txt").write_text("not a shard\n")
    (inputs / "garbage.pt").write_bytes(os.urandom(4096))
    (inputs / "garbage.tar").write_bytes(os.urandom(4096))
    torch.save({"weights": torch.zeros(2)}, inputs / "foreign.pt")
    state = {f"encoder_q.backbone.{name}": tensor for name, tensor in create_backbone("test_resnet").state_dict().items()}
    checkpoint = save_checkpoint(inputs / "run", 1, {"model": state, "step": 1, "backbone_prefix": "encoder_q.backbone.",
                                                     "config": {"model": "test_resnet", "crop_size": 32}})
    return {"inputs": inputs, "shards": sample_shards, "tar": sample_shards / "shard-000000.tar",
            "empty": inputs / "empty", "text": inputs / "notes.txt", "garbage": inputs / "garbage.pt",
            "foreign": inputs / "foreign.pt", "checkpoint": checkpoint, "missing": inputs / "no" / "such" / "path",
            "garbage_tar": inputs / "garbage.tar"}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_input_is_one_line_and_writes_nowhere_else(case, sandbox, tmp_path):
    if case.needs_no_cuda and torch.cuda.is_available():
        pytest.skip("the case needs a machine without CUDA")
    work, cache = tmp_path / "work", tmp_path / "cache"
    for folder in (work, cache, tmp_path / "tmp"):
        folder.mkdir()
    out = work / ("grid.png" if "{png}" in case.argv else "out")
    names = {**{key: str(value) for key, value in sandbox.items()}, "out": str(out), "png": str(out)}
    argv = [sys.executable if part == "python" else part.format(**names) for part in case.argv]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HOME": str(cache / "home"),
                   "TMPDIR": str(tmp_path / "tmp"), "ECOMAUG_CACHE_DIR": str(cache / "ecomaug"),
                   "MPLCONFIGDIR": str(cache / "matplotlib"), "XDG_CACHE_HOME": str(cache)}
    before = snapshot(tmp_path, skip=(out, cache)), snapshot(sandbox["inputs"], skip=()), \
        snapshot(sandbox["shards"], skip=())

    done = subprocess.run(argv, cwd=work, env=environment, capture_output=True, text=True, timeout=180)

    assert done.returncode == case.code, f"exit {done.returncode}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    if case.code == 2:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr[-3000:]
        assert case.says in lines[0]
        assert not out.exists(), "a failed command created its output"
    after = snapshot(tmp_path, skip=(out, cache)), snapshot(sandbox["inputs"], skip=()), \
        snapshot(sandbox["shards"], skip=())
    assert after == before, "written outside the output path"
