"""Training under hostile conditions: stop signals, a full disk, a rerun into a used --out, ViTs, the umask."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ecomaug import engine
from ecomaug.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from ecomaug.config import parse_config
from ecomaug.evaluation.embed import DiskFullError

REPO = Path(__file__).resolve().parents[1]
# A tiny timm ResNet on 32-px crops: one 64-image shard is 8 steps per epoch at batch 8.
TINY = ["--model", "test_resnet", "--crop-size", "32", "--batch-size", "8", "--queue-size", "32",
        "--backend", "torch", "--num-workers", "0", "--hidden-dim", "64", "--dim", "32",
        "--no-channels-last", "--no-progress", "--keep-last", "2"]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def train_py(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=environment(),
                          capture_output=True, text=True, timeout=300)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def error_line(stderr: str) -> str:
    """The one line a failed command printed (asserting it is one, and no traceback)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@contextmanager
def tiny_disk(path: Path, size: str):
    """A tmpfs of ``size`` at ``path``: a disk that really fills up (skips where mount is refused)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- stop signals ------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_the_step_and_resume_auto_continues_bit_exactly(sample_shards, tmp_path):
    data = str(sample_shards / "shard-000000.tar")
    flags = ["--data", data, *TINY, "--epochs", "3", "--log-every", "1", "--checkpoint-every", "1000",
             "--no-export"]  # 24 steps; no periodic checkpoint: the one found is the signal's
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *flags, "--out", str(out)], cwd=tmp_path,
                               env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").is_file() and '"train"' in (out / "metrics.jsonl").read_text()):
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no metric line in time"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM == 143, stderr[-3000:]
    line = error_line(stderr)
    stopped = [record for record in records(out) if record["event"] == "interrupted"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM"
    step = stopped[0]["step"]
    assert 1 <= step < 24
    assert [found for found, _ in list_checkpoints(out)] == [step]
    path = list_checkpoints(out)[0][1]
    assert load_checkpoint(path)["step"] == step
    assert line == f"stopped by SIGTERM at step {step}: checkpoint {path}; continue with --resume auto"

    resumed = train_py(*flags, "--out", str(out), "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resume_records = [record for record in records(out) if record["event"] == "resume"]
    assert [record["step"] for record in resume_records] == [step]
    straight = train_py(*flags, "--out", str(tmp_path / "straight"), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    final, reference = (load_checkpoint(list_checkpoints(run)[0][1]) for run in (out, tmp_path / "straight"))
    assert final["step"] == reference["step"] == 24
    assert final["model"].keys() == reference["model"].keys()
    different = [name for name, tensor in reference["model"].items() if not torch.equal(tensor, final["model"][name])]
    assert not different, f"an interrupted + resumed run differs from a straight one in {different[:5]}"


main_thread_only = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                      reason="signal handlers can only be set in the main thread")


@main_thread_only
def test_a_second_signal_aborts_at_once_and_handlers_are_restored():
    # A background job (nohup, CI) may start with SIGINT ignored, which StopSignals keeps: give
    # this test Python's usual SIGINT handler so that the second signal is really delivered.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        with engine.StopSignals() as stops:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs between bytecodes of the main thread
            assert stops.received == signal.SIGTERM  # the first one only sets the flag
            with pytest.raises(engine.TrainingAborted, match="second SIGINT"):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    finally:
        signal.signal(signal.SIGINT, outer)


@main_thread_only
def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a shell's background job
    try:
        with engine.StopSignals() as stops:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert stops.received is None
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_signal_before_the_first_step_saves_nothing(sample_shards, tmp_path, monkeypatch):
    real_enter = engine.StopSignals.__enter__

    def enter_and_signal(self):
        stops = real_enter(self)
        stops.received = signal.SIGTERM  # as if SIGTERM came during the setup
        return stops

    monkeypatch.setattr(engine.StopSignals, "__enter__", enter_and_signal)
    config = parse_config(["--data", str(sample_shards / "shard-000000.tar"), "--out", str(tmp_path / "run"), *TINY])
    with pytest.raises(engine.TrainingInterrupted, match="at step 0: no step done") as stop:
        engine.train(config)
    assert stop.value.exit_code == 143 and stop.value.checkpoint is None
    assert list_checkpoints(tmp_path / "run") == []


# -- inputs checked before any work, and a used --out -------------------------------------------


@pytest.mark.parametrize("flag, value, error", [
    ("--val-data", "/nonexistent/val", FileNotFoundError),
    ("--resume", "/nonexistent/ckpt.pt", FileNotFoundError),
    ("--model", "no_such_timm_model", ValueError),
    ("--device", "bogus", ValueError),
])
def test_a_bad_input_fails_before_any_work_and_creates_nothing(sample_shards, tmp_path, flag, value, error):
    out = tmp_path / "run"
    config = parse_config(["--data", str(sample_shards / "shard-000000.tar"), "--out", str(out), *TINY,
                           "--epochs", "1", flag, value])
    with pytest.raises(error):
        engine.train(config)
    assert not out.exists()


def test_a_used_out_is_refused_unless_resume_or_overwrite(sample_shards, tmp_path):
    out = tmp_path / "run"
    flags = ["--data", str(sample_shards / "shard-000000.tar"), "--out", str(out), *TINY, "--max-steps", "2",
             "--log-every", "1", "--no-export"]
    engine.train(parse_config(flags))
    metrics_before = (out / "metrics.jsonl").read_bytes()
    checkpoint_before = (out / "checkpoints" / "ckpt-00000002.pt").read_bytes()

    with pytest.raises(FileExistsError) as refused:
        engine.train(parse_config(flags))
    message = str(refused.value)
    assert str(out) in message and "add --resume auto" in message and "or --overwrite" in message
    assert (out / "metrics.jsonl").read_bytes() == metrics_before
    assert (out / "checkpoints" / "ckpt-00000002.pt").read_bytes() == checkpoint_before

    result = engine.train(parse_config([*flags, "--resume", "auto", "--max-steps", "3"]))
    assert result.step == 3

    result = engine.train(parse_config([*flags, "--overwrite", "--max-steps", "1"]))
    assert result.step == 1
    assert [event["event"] for event in records(out)].count("start") == 1  # the old run's records are gone
    assert [step for step, _ in list_checkpoints(out)] == [1]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) <= 1
    with pytest.raises(ValueError, match="contradict"):
        parse_config([*flags, "--overwrite", "--resume", "auto"])


def test_train_py_refusal_tells_the_user_what_to_add(sample_shards, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    save_checkpoint(out, 5, {"model": {}, "step": 5})
    done = train_py("--data", str(sample_shards / "shard-000000.tar"), "--out", str(out), *TINY, cwd=tmp_path)
    assert done.returncode == 2
    line = error_line(done.stderr)
    assert line.startswith("Error: ") and "add --resume auto" in line and "--overwrite" in line
    assert sorted(path.name for path in out.iterdir()) == ["checkpoints"]  # no config.json, no metrics


# -- a ViT at a crop other than 224 ---------------------------------------------------------------


@pytest.mark.slow
def test_a_vit_trains_at_64_pixels_and_its_export_and_checkpoint_load(sample_shards, tmp_path):
    from ecomaug.evaluation.embed import load_checkpoint as embed_checkpoint
    from ecomaug.evaluation.embed import load_export

    out = tmp_path / "run"
    config = parse_config(["--data", str(sample_shards / "shard-000000.tar"), "--out", str(out), *TINY,
                           "--model", "vit_small_patch16_224", "--crop-size", "64", "--max-steps", "1"])
    result = engine.train(config)
    assert result.step == 1
    assert json.loads((out / "export" / "config.json").read_text())["input_size"] == [3, 64, 64]
    import timm

    vit = timm.create_model(f"local-dir:{out / 'export'}", pretrained=True)  # img_size 64 from model_args
    assert vit.pretrained_cfg["input_size"] == [3, 64, 64] and vit.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 384)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    for model in (load_export(out / "export", device=torch.device("cpu")),
                  embed_checkpoint(result.checkpoint, device=torch.device("cpu"))):
        assert model.input_size == 64 and model.embed(images).shape == (2, 384)


# -- a full disk --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_during_training_is_one_line_and_keeps_the_previous_checkpoint(sample_shards, tmp_path):
    with tiny_disk(tmp_path / "disk", "7m") as disk:  # one 4.7 MB checkpoint fits, a second does not
        out = disk / "run"
        done = train_py("--data", str(sample_shards / "shard-000000.tar"), "--out", str(out), *TINY,
                        "--max-steps", "6", "--checkpoint-every", "2", "--no-export", cwd=tmp_path)
        assert done.returncode == 2, done.stderr[-3000:]
        line = error_line(done.stderr)
        assert line.startswith(f"Error: disk full while writing {out / 'checkpoints' / 'ckpt-00000004.pt'}")
        assert [path.name for path in (out / "checkpoints").iterdir()] == ["ckpt-00000002.pt"]  # no temp file
        assert load_checkpoint(out / "checkpoints" / "ckpt-00000002.pt")["step"] == 2


def test_a_full_disk_during_export_is_one_line_and_keeps_the_previous_export(sample_shards, tmp_path):
    from ecomaug.evaluation.embed import load_export
    from ecomaug.export import create_backbone, export_backbone

    source = tmp_path / "ckpt"
    timm_state = create_backbone("test_resnet").state_dict()
    checkpoint = save_checkpoint(source, 1, {"model": {f"encoder_q.backbone.{k}": v for k, v in timm_state.items()},
                                             "step": 1, "config": {"model": "test_resnet", "crop_size": 32},
                                             "backbone_prefix": "encoder_q.backbone."})
    with tiny_disk(tmp_path / "disk", "2m") as disk:  # one 1.5 MB export fits
        export_backbone(timm_state, disk / "export", model_name="test_resnet", input_size=32)
        before = {path.name: path.read_bytes() for path in (disk / "export").iterdir()}
        (disk / "filler").write_bytes(b"\0" * 300_000)
        done = subprocess.run([sys.executable, "-m", "ecomaug.cli", "export", str(checkpoint), "--out",
                               str(disk / "export")], cwd=tmp_path, env=environment(), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2, done.stderr[-3000:]
        assert error_line(done.stderr).startswith(f"Error: disk full while writing {disk / 'export'}")
        after = {path.name: path.read_bytes() for path in (disk / "export").iterdir()}
        assert after == before  # the previous export, byte for byte, and no temporary file
        load_export(disk / "export", device=torch.device("cpu"))


def test_a_checkpoint_whose_fsync_reports_enospc_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno

    import ecomaug.checkpoint as checkpoint_module

    save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(3)}, "step": 1})

    def full(descriptor: int) -> None:  # NFS and quotas report a full disk as late as fsync
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.os, "fsync", full)
    with pytest.raises(DiskFullError, match="disk full while writing .*ckpt-00000002.pt"):
        save_checkpoint(tmp_path, 2, {"model": {"w": torch.zeros(3)}, "step": 2})
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == ["ckpt-00000001.pt"]


# -- the umask ----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_checkpoints_and_exports_honour_the_umask(tmp_path, umask, mode):
    from ecomaug.export import create_backbone, export_backbone

    previous = os.umask(umask)
    try:
        checkpoint = save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(3)}, "step": 1})
        export = export_backbone(create_backbone("test_resnet"), tmp_path / "export", model_name="test_resnet",
                                 input_size=32)
    finally:
        os.umask(previous)
    for path in (checkpoint, export / "backbone.safetensors", export / "config.json", export / "model.safetensors"):
        assert oct(path.stat().st_mode & 0o777) == oct(mode), path


def test_export_size_is_bounded_and_refused_for_a_model_with_position_embeddings(tmp_path):
    from ecomaug.engine.setup import build_objective

    with pytest.raises(ValueError, match="--export-size must be in"):
        parse_config(["--data", "x", "--out", str(tmp_path), *TINY, "--export-size", "100000"])
    vit = parse_config(["--data", "x", "--out", str(tmp_path), *TINY, "--model", "vit_small_patch16_224",
                        "--crop-size", "64", "--export-size", "96"])
    with pytest.raises(ValueError, match="position embeddings"):
        build_objective(vit, queue_size=32, bn_splits=1)
    cnn = parse_config(["--data", "x", "--out", str(tmp_path), *TINY, "--export-size", "48"])
    assert build_objective(cnn, queue_size=32, bn_splits=1).backbone is not None


def test_an_export_of_a_model_with_position_embeddings_is_refused_at_another_size_in_one_line(tmp_path):
    """A ViT's position embeddings fit the size it trained at: another export size, or extra sizes
    (multi-scale), is one clear line, not a shape mismatch deep in the weight check."""
    from ecomaug.export import create_backbone, export_backbone

    state = create_backbone("test_vit", img_size=32).state_dict()
    with pytest.raises(ValueError, match="test_vit has position embeddings .* not 48 px: export it at its training"):
        export_backbone(state, tmp_path / "at48", model_name="test_vit", input_size=48)
    with pytest.raises(ValueError, match="no extra sizes"):
        export_backbone(state, tmp_path / "multi", model_name="test_vit", input_size=32, extra_sizes=(16,))
    assert (export_backbone(state, tmp_path / "same", model_name="test_vit", input_size=32) / "config.json").is_file()
