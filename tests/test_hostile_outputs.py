"""Hostile output places and stops: a read-only output, another run's --config, code beside a
recipe file, Ctrl-C during the start or the end of a run, a resumed run's records, killed workers.

Nothing may end in a traceback or hang: a failure is one ``Error: ...`` line and exit code 2, a
stop is honoured (exit 130/143) whenever it comes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ecomaug import engine
from ecomaug.checkpoint import list_checkpoints, save_checkpoint
from ecomaug.cli import is_user_error, main, one_line
from ecomaug.config import parse_arguments, parse_config
from ecomaug.engine.metrics import MetricsLog
from ecomaug.paths import SAMPLE_DIR

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "test_resnet", "--crop-size", "32", "--batch-size", "8", "--queue-size", "32",
        "--backend", "torch", "--num-workers", "0", "--hidden-dim", "64", "--dim", "32",
        "--no-channels-last", "--no-progress"]
main_thread_only = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                      reason="signal handlers can only be set in the main thread")


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def one_error_line(text: str) -> str:
    """The one line a failed command printed (asserting it is one, with no traceback)."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("import time:")]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    assert lines[0].startswith("Error: "), text[-3000:]
    return lines[0]


# -- 3. an output place that cannot be written ---------------------------------------------------


@pytest.fixture(scope="module")
def unwritable(tmp_path_factory) -> Path:
    """A folder on a read-only tmpfs (EROFS even for root); unprivileged: a folder without write access."""
    folder = tmp_path_factory.mktemp("unwritable") / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        if os.geteuid() == 0:
            pytest.skip(f"root, and no read-only tmpfs here: {mounted.stderr.decode().strip()}")
        folder.chmod(0o500)
    yield folder
    if mounted.returncode == 0:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
    else:
        folder.chmod(0o700)


@pytest.fixture(scope="module")
def inputs(sample_shards, tmp_path_factory) -> dict[str, Path]:
    """A shard, three photos, a mark pool and a training checkpoint of a tiny backbone."""
    from ecomaug.export import create_backbone

    root = tmp_path_factory.mktemp("inputs")
    (root / "photos").mkdir()
    for path in sorted((SAMPLE_DIR / "images").glob("*.jpg"))[:3]:
        shutil.copy(path, root / "photos" / path.name)
    backbone = create_backbone("test_resnet").state_dict()
    state = {f"encoder_q.backbone.{name}": tensor for name, tensor in backbone.items()}
    checkpoint = save_checkpoint(root / "run", 1, {"model": state, "step": 1, "backbone_prefix": "encoder_q.backbone.",
                                                   "config": {"model": "test_resnet", "crop_size": 32}})
    marks = REPO / "ecomaug" / "assets" / "watermarks"
    return {"tar": sample_shards / "shard-000000.tar", "tar2": sample_shards / "shard-000001.tar",
            "shards": sample_shards, "photos": root / "photos", "checkpoint": checkpoint, "marks": marks}


COMMANDS = {
    "shard": ["shard", "{photos}", "{out}", "--workers", "0", "--no-progress"],
    "dewatermark": ["dewatermark", "{photos}", "{out}", "--marks", "{marks}", "--workers", "0", "--no-progress"],
    "preview": ["preview", "--shards", "{tar}", "--out", "{out}.png", "-n", "2", "--size", "32"],
    "train": ["train", "--data", "{tar}", "--out", "{out}", *TINY, "--epochs", "1"],
    "export": ["export", "{checkpoint}", "--out", "{out}"],
    "embed-folder": ["embed", "--model", "{checkpoint}", "--data", "{tar}", "--out", "{out}", "--no-progress"],
    "embed-npz": ["embed", "--model", "{checkpoint}", "--data", "{tar}", "--out", "{out}.npz", "--no-progress"],
    "eval": ["eval", "--gallery", "{shards}", "--random-init", "test_resnet", "--input-size", "32", "--out", "{out}",
             "--max-items", "4", "--disturbance", "clean", "--no-progress"],
    "match": ["match", "--a", "{tar}", "--b", "{tar2}", "--model", "{checkpoint}", "--out", "{out}",
              "--no-progress"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_an_unwritable_output_is_one_line_and_exit_2(name, inputs, unwritable):
    names = {**{key: str(value) for key, value in inputs.items()}, "out": str(unwritable / "out")}
    result = CliRunner().invoke(main, [part.format(**names) for part in COMMANDS[name]])
    assert result.exit_code == 2, f"{result.exit_code}: {result.output[-2000:]}\n{result.exception!r}"
    line = one_error_line(result.output)
    assert str(unwritable) in line, line
    assert not any(unwritable.iterdir())


def test_train_py_with_an_unwritable_out_is_one_line_before_any_work(inputs, unwritable, capsys):
    code = engine.main(["--data", str(inputs["tar"]), "--out", str(unwritable / "run" / "deeper"), *TINY],
                       prog="train.py")
    assert code == 2
    assert str(unwritable) in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("number", [errno.EROFS, errno.ENAMETOOLONG])
def test_an_unwritable_place_is_a_user_error_in_one_line(number):
    error = OSError(number, os.strerror(number), "/mnt/ro/out")
    assert is_user_error(error) and one_line(error) == f"{os.strerror(number)}: /mnt/ro/out"
    assert not is_user_error(OSError(errno.EIO, "Input/output error", "/dev/sda"))  # a failing disk keeps its traceback


def test_a_file_in_the_way_of_the_output_is_one_line(tmp_path):
    from loaders.atomic import check_writable

    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError) as caught:
        check_writable(tmp_path / "file" / "out" / "report")
    assert one_line(caught.value).endswith(str(tmp_path / "file"))
    check_writable(tmp_path / "new" / "out")  # creates nothing, refuses nothing
    assert not (tmp_path / "new").exists()


# -- 9. --config of another run ------------------------------------------------------------------


def test_the_config_of_another_run_does_not_choose_where_this_run_writes(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    parse_config(["--data", "shards", "--out", str(other), "--batch-size", "16"]).save(other / "config.json")
    before = (other / "config.json").read_bytes()

    with pytest.raises(ValueError, match=r"does not choose where a run writes: add --out DIR"):
        parse_arguments(["--config", str(other / "config.json")])
    for argv in (["--config", str(other / "config.json")],
                 ["--config", str(other / "config.json"), "--overwrite"],
                 ["--config", str(other / "config.json"), "--resume", "auto"]):
        assert engine.main(argv, prog="train.py") == 2
        assert "add --out DIR" in one_error_line(capsys.readouterr().err)
    assert sorted(path.name for path in other.iterdir()) == ["config.json"]
    assert (other / "config.json").read_bytes() == before

    config = parse_config(["--config", str(other / "config.json"), "--out", str(tmp_path / "mine")])
    assert config.out == str(tmp_path / "mine") and config.batch_size == 16  # the rest of the file applies
    assert "--out" in parse_config_help()


def parse_config_help() -> str:
    from ecomaug.config import build_parser

    return next(action.help for action in build_parser()._actions if "--config" in action.option_strings)


# -- 10. code beside a recipe file ---------------------------------------------------------------


def evil_recipe(folder: Path) -> tuple[Path, Path]:
    """``evil_mod.py`` in ``folder`` leaves a marker when imported; a recipe file names ``evil_mod:X``."""
    marker = folder / "imported.marker"
    (folder / "evil_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass X:\n    pass\n")
    (folder / "recipe.yaml").write_text("stages:\n  - {name: evil, class: 'evil_mod:X'}\n")
    return folder / "recipe.yaml", marker


def test_a_recipe_class_is_not_imported_from_the_current_folder(tmp_path, monkeypatch):
    from ecomaug.recipe_config import resolve_recipe

    recipe, marker = evil_recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python -m ecomaug` puts the current folder first
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delitem(sys.modules, "evil_mod", raising=False)
    with pytest.raises(ValueError, match="cannot import 'evil_mod'.*current folder is not searched"):
        resolve_recipe(config_file=recipe)
    assert not marker.exists()
    assert sys.path[0] == str(tmp_path)  # put back

    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # asked for: imported, then refused as no augmentation
    with pytest.raises(ValueError, match="is not a Kornia augmentation"):
        resolve_recipe(config_file=recipe)
    assert marker.exists()
    sys.modules.pop("evil_mod", None)


def test_python_m_ecomaug_preview_runs_no_code_from_the_current_folder(tmp_path):
    recipe, marker = evil_recipe(tmp_path)
    environment_without_cwd = {key: value for key, value in environment().items() if key != "PYTHONPATH"}
    environment_without_cwd["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-m", "ecomaug", "preview", "--recipe-config", str(recipe), "--images",
                           str(SAMPLE_DIR / "images"), "--out", str(tmp_path / "grid.png"), "-n", "1", "--size", "32"],
                          cwd=tmp_path, env=environment_without_cwd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "cannot import 'evil_mod'" in one_error_line(done.stderr)
    assert not marker.exists() and not (tmp_path / "grid.png").exists()


# -- 11. stops at the start and the end of a run, resumed records, killed workers ----------------


def test_ctrl_c_while_train_py_imports_is_one_line_and_exit_130(tmp_path):
    # -X importtime reports each import as it completes: once torch's first modules are in, the
    # process is inside `import torch` (seconds), long before any handler of the run is installed.
    command = [sys.executable, "-X", "importtime", str(REPO / "train.py"), "--out", str(tmp_path / "run")]
    process = subprocess.Popen(command, cwd=tmp_path, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = []
        for line in process.stderr:
            seen.append(line)
            if line.rsplit("|", 1)[-1].strip().startswith("torch."):
                process.send_signal(signal.SIGINT)
                break
        rest = process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, "".join(seen[-5:]) + rest[-3000:]
    assert "interrupted by SIGINT" in one_error_line(rest)
    assert not (tmp_path / "run").exists()


def test_ctrl_c_around_the_run_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.command, "parse_arguments", interrupted)
    monkeypatch.setattr("loaders.convert.convert_to_shards", interrupted)
    try:  # an escaped KeyboardInterrupt would end the whole test session: make it this test's failure
        code = engine.main(["--out", "anywhere"], prog="train.py")
        assert "interrupted by SIGINT" in one_error_line(capsys.readouterr().err)
        result = CliRunner().invoke(main, ["shard", "in", "out"])
    except KeyboardInterrupt:
        pytest.fail("a KeyboardInterrupt escaped the command's entry")
    assert code == 130
    assert result.exit_code == 130 and "interrupted by SIGINT" in one_error_line(result.output)


@main_thread_only
def test_a_signal_noted_but_never_acted_on_is_raised_again_at_the_end():
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with engine.StopSignals() as stops:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
                assert stops.received == signal.SIGINT  # noted only: the block ends normally
        with engine.StopSignals():  # nothing noted: nothing raised
            pass
    finally:
        signal.signal(signal.SIGINT, outer)


@main_thread_only
def test_a_stop_during_the_export_is_honoured(sample_shards, tmp_path, monkeypatch):
    import ecomaug.export

    real_export = ecomaug.export.export_backbone

    def export_then_sigterm(*args, **kwargs):
        found = real_export(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the loop is over: before the fix, nobody looked
        time.sleep(0.01)
        return found

    monkeypatch.setattr(ecomaug.export, "export_backbone", export_then_sigterm)
    out = tmp_path / "run"
    config = parse_config(["--data", str(sample_shards / "shard-000000.tar"), "--out", str(out), *TINY,
                           "--epochs", "1"])
    # Should the stop be missed, StopSignals raises it again at its exit: into this harmless handler.
    outer = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with pytest.raises(engine.TrainingInterrupted) as stop:
            engine.train(config)
    finally:
        signal.signal(signal.SIGTERM, outer)
    assert stop.value.exit_code == 143 and stop.value.step == 8
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "interrupted" and not any(record["event"] == "end" for record in records)
    assert (out / "export" / "backbone.safetensors").is_file()


def test_a_resumed_run_records_each_step_once(sample_shards, tmp_path):
    out = tmp_path / "run"
    flags = ["--data", str(sample_shards / "shard-000000.tar"), "--out", str(out), *TINY, "--epochs", "1",
             "--log-every", "1", "--checkpoint-every", "4", "--keep-last", "3", "--no-export"]
    engine.train(parse_config(flags))
    # As if SIGKILL had come before the epoch-end checkpoint: steps 5-8 were logged, never saved.
    assert [step for step, _ in list_checkpoints(out)] == [8, 4]
    list_checkpoints(out)[0][1].unlink()
    with (out / "metrics.jsonl").open("a") as stream:
        stream.write('{"event": "train", "step": 9, "lo')  # and a torn last line
    engine.train(parse_config([*flags, "--resume", "auto"]))

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in records if record["event"] == "train"]
    assert steps == list(range(1, 9)), steps
    assert [record["step"] for record in records if record["event"] == "resume"] == [4]
    assert [record["event"] for record in records].count("end") == 1


def test_metrics_resume_drops_the_records_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    for step in range(1, 7):
        log.write("train", step=step, loss=1.0)
    log.close()
    again = MetricsLog(tmp_path, enabled=True)
    again.resume(3, checkpoint="ckpt-3")
    again.close()
    events = [(record["event"], record["step"]) for record in map(json.loads, (tmp_path / "metrics.jsonl").open())]
    assert events == [("train", 1), ("train", 2), ("train", 3), ("resume", 3)]


KILLED_PARENT = """
import os, signal, time
from loaders.convert import convert_to_shards

PARENT = os.getpid()

def hook(image):  # runs in a worker: the parent dies while this worker holds a result for it
    if os.getppid() == PARENT:
        os.kill(PARENT, signal.SIGKILL)
    time.sleep(0.2)
    return image, {{}}, False

convert_to_shards({photos!r}, {out!r}, workers=2, max_size=64, progress=False, image_hook=hook)
"""


def test_workers_of_a_killed_conversion_end_without_a_traceback(tmp_path):
    (tmp_path / "photos").mkdir()
    for path in sorted((SAMPLE_DIR / "images").glob("*.jpg"))[:8]:
        shutil.copy(path, tmp_path / "photos" / path.name)
    script = KILLED_PARENT.format(photos=str(tmp_path / "photos"), out=str(tmp_path / "out"))
    done = subprocess.run([sys.executable, "-c", script], env=environment(), capture_output=True, text=True,
                          timeout=120)  # reads until the workers, which share stderr, are gone too
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert done.stderr == "", done.stderr[-3000:]


def test_the_quiet_worker_loop_swallows_only_a_broken_pipe():
    from loaders.convert.workers import _worker_quietly

    def broken(*args):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    _worker_quietly(broken, 1, 2)
    with pytest.raises(ZeroDivisionError):  # anything else is the pool's to report
        _worker_quietly(lambda: 1 / 0)
