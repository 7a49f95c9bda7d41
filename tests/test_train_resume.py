"""A run killed with SIGKILL resumes with --resume auto from its last checkpoint: same step, same queue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ecomaug import engine
from ecomaug.checkpoint import list_checkpoints, load_checkpoint
from ecomaug.config import parse_config

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "test_resnet", "--crop-size", "32", "--batch-size", "8", "--queue-size", "32",
         "--checkpoint-every", "2", "--log-every", "1", "--backend", "torch", "--num-workers", "0",
         "--hidden-dim", "64", "--dim", "32", "--no-channels-last", "--no-progress", "--no-export",
         "--keep-last", "2"]


@pytest.mark.slow
def test_sigkill_then_resume_auto(sample_shards, tmp_path):
    out = tmp_path / "run"
    data = str(sample_shards / "shard-000000.tar")  # 64 images: 8 steps per epoch
    command = [sys.executable, str(REPO / "train.py"), "--data", data, "--out", str(out), *FLAGS,
               "--max-steps", "1000"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not any(step >= 4 for step, _ in list_checkpoints(out)):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint at step 4 in time"
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    killed_step, killed_path = list_checkpoints(out)[0]
    saved = load_checkpoint(killed_path)
    assert saved["step"] == killed_step >= 4

    config = parse_config(["--data", data, "--out", str(out), *FLAGS, "--resume", "auto",
                           "--max-steps", str(killed_step + 3)])
    result = engine.train(config)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resume = [r for r in records if r["event"] == "resume"]
    assert len(resume) == 1
    assert resume[0]["step"] == killed_step and resume[0]["checkpoint"] == str(killed_path)
    assert resume[0]["queue_ptr"] == int(saved["model"]["queue_ptr"])
    assert resume[0]["queue_sum"] == pytest.approx(float(saved["model"]["queue"].double().sum()), abs=0)
    after = [r["step"] for r in records[records.index(resume[0]):] if r["event"] == "train"]
    assert after == [killed_step + 1, killed_step + 2, killed_step + 3]
    assert result.step == killed_step + 3
    final = load_checkpoint(result.checkpoint)
    assert final["step"] == killed_step + 3
    # The loader position continues too: (epoch, batch) advanced by exactly 3 batches of 8.
    position = lambda state: state["epoch"] * 8 + state["batch_in_epoch"]  # noqa: E731
    assert position(final) == position(saved) + 3
