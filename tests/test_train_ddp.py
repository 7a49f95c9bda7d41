"""Two processes on CPU with gloo under torchrun: the run completes and both ranks end equal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecomaug.checkpoint import list_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_two_ranks_on_cpu(sample_shards, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train.py"), "--data", str(sample_shards), "--out", str(out),
               "--model", "test_resnet", "--crop-size", "32", "--batch-size", "8", "--queue-size", "64",
               "--max-steps", "4", "--log-every", "2", "--checkpoint-every", "2", "--device", "cpu",
               "--backend", "torch", "--num-workers", "0", "--hidden-dim", "64", "--dim", "32",
               "--no-channels-last", "--no-progress"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    completed = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    assert start["world_size"] == 2 and start["global_batch"] == 16 and start["bn_splits"] == 1
    end = next(r for r in records if r["event"] == "end")
    fingerprints = end["rank_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]  # both ranks, same weights
    state = load_checkpoint(list_checkpoints(out)[0][1])
    assert state["step"] == 4 and len(state["rng"]) == 2  # one RNG state per rank
    # Each rank drew its own augmentations (seed + rank).
    assert not torch.equal(state["rng"][0]["augment"], state["rng"][1]["augment"])
    # Gathered keys were enqueued: 4 steps x 16 keys = the whole queue of 64 is real keys now.
    assert int(state["model"]["queue_ptr"]) == 0
    assert (out / "export" / "backbone.safetensors").is_file()
