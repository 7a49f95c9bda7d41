"""The engine's command line: ``--config`` (YAML/JSON, flags override, config.json round-trips),
``--log-level``, one message per repeat, and TensorBoard without one-point charts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ecomaug.config import PRESETS, TrainConfig, parse_arguments, parse_config, read_config_file


def test_a_run_config_json_round_trips_as_config(tmp_path):
    config = parse_config(["--preset", "sample", "--batch-size", "16", "--opt", "adamw", "--max-steps", "7",
                           "--out", str(tmp_path / "run")])
    config.save(tmp_path / "config.json")
    again = parse_config(["--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "run")])
    assert again == config


def test_a_run_config_never_brings_back_overwrite_or_resume(tmp_path):
    config = parse_config(["--preset", "sample", "--out", str(tmp_path / "run"), "--overwrite"])
    config.save(tmp_path / "config.json")
    again = parse_config(["--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "again")])
    assert again.overwrite is False and again.resume is None  # re-running a config clears no folder
    resumed = parse_config(["--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "run"),
                            "--resume", "auto"])
    assert resumed.resume == "auto" and resumed.overwrite is False


def test_yaml_config_sets_fields_and_flags_override_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: resnet34\nbatch-size: 48\nbase_lr: 1\nmax_steps: null\nclip_grad: 1.5\n")
    config = parse_config(["--config", str(path), "--batch-size", "8", "--data", "shards"])
    assert config.model == "resnet34" and config.batch_size == 8  # the flag wins
    assert config.base_lr == 1.0 and isinstance(config.base_lr, float) and config.clip_grad == 1.5
    assert config.preset is None and config.epochs == TrainConfig().epochs
    sample = parse_config(["--config", str(path)])  # no data: the sample preset, then the file
    assert sample.preset == "sample" and sample.model == "resnet34"
    assert sample.crop_size == PRESETS["sample"]["crop_size"]


@pytest.mark.parametrize("text, message", [
    ("batch_sise: 3\n", "unknown field 'batch_sise'"),
    ("batch_size: '32'\n", "batch_size must be int"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_a_bad_config_file_is_one_value_error_naming_the_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_config_file(path)


@pytest.mark.parametrize("value", ["1e-30", "0", "-0.2", "11"])
def test_a_temperature_outside_its_range_is_one_value_error(value):
    with pytest.raises(ValueError, match=r"--temperature must be in 0\.001\.\.10"):
        parse_config(["--data", "shards", "--temperature", value])


@pytest.mark.parametrize("pair", ["foo", "=1", ""])
def test_a_recipe_setting_without_name_equals_value_is_refused_before_any_work(pair):
    with pytest.raises(ValueError, match="--recipe-set expects NAME=VALUE"):
        parse_config(["--data", "shards", "--recipe-set", pair])


def test_a_missing_config_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        parse_config(["--config", str(tmp_path / "nope.yaml")])


def test_log_level_is_a_command_option_not_a_config_field():
    config, options = parse_arguments(["--log-level", "info", "--data", "x"])
    assert options.log_level == "info" and options.config is None
    assert "log_level" not in config.to_dict()
    with pytest.raises(ValueError, match="invalid choice"):
        parse_arguments(["--log-level", "loud"])


def test_a_repeated_message_is_said_once_then_counted(capsys):
    from ecomaug.logs import configure_logging, report_repeats

    configure_logging("info")
    try:
        log = logging.getLogger("loaders.build")
        for _ in range(5):
            log.info("loader backend: torch (asked for)")
        log.debug("not shown at info")
        report_repeats()
    finally:
        configure_logging("warning")
    err = capsys.readouterr().err.splitlines()
    assert err == ["INFO: loader backend: torch (asked for)",
                   "INFO: said 5 times in all: loader backend: torch (asked for)"]


def test_a_command_reports_only_its_own_repeats(capsys):
    from ecomaug.logs import configure_logging, report_repeats

    configure_logging("warning")
    try:
        for _ in range(3):  # earlier work in the same process, e.g. a library call between commands
            logging.getLogger("loaders.build").warning("an old warning")
        configure_logging("warning")  # the next command starts
        report_repeats()
    finally:
        configure_logging("warning")
    assert "said 3 times" not in capsys.readouterr().err


def test_start_and_end_records_go_to_the_text_tab_not_to_charts(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ecomaug.engine.metrics import MetricsLog

    log = MetricsLog(tmp_path, enabled=True)
    log.write("start", step=0, lr=0.1, world_size=1)
    for step in (1, 2):
        log.write("train", step=step, loss=1.0 / step, lr=0.1)
    log.write("end", step=2, loss=0.5, checkpoint="ckpt")
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/lr"]
    assert {"start/text_summary", "end/text_summary"} <= set(events.Tags()["tensors"])
    assert [json.loads(line)["event"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        ["start", "train", "train", "end"]
