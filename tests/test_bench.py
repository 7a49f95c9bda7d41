"""python -m bench: the harness, the pipeline benchmark (every stage runs on tiny settings and reports sane figures; verdict and CLI errors.

No test asserts a duration: timings on a shared test machine mean nothing. They check that each
stage ran, that the JSON has its schema, that every figure is positive and finite, and that the
verdict logic names the right stage for hand-made figures.) and the GPU section's smoke run on the CPU.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from bench.harness import STAGES, cli
from bench.report import FORMAT_NAME, FORMAT_VERSION, table_text, to_json, verdict, write_outputs
from bench.runner import run_benchmark
from bench.stages import BenchConfig, BenchRun, StageResult
from bench.streams import time_batches, time_stream
from bench.timing import Measurement
from loaders.build import dali_available

REPO = Path(__file__).resolve().parents[1]

TINY = {"batch_size": 4, "crop_size": 32, "model": "test_resnet", "warmup": 1, "iters": 1, "repeats": 2,
        "num_workers": 1, "queue_size": 64, "threads": 1}


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_stage_runs_and_reports_positive_finite_figures(sample_shards, device, tmp_path):
    backends = ("dali", "torch") if dali_available() else ("torch",)
    run = run_benchmark(BenchConfig(shards=str(sample_shards), device=device, backends=backends, **TINY),
                        progress=False)
    paths = write_outputs(run, tmp_path)
    report = json.loads(paths["json"].read_text())

    assert report["format"] == FORMAT_NAME and report["format_version"] == FORMAT_VERSION
    assert set(report) >= {"settings", "conditions", "shards", "results", "unavailable", "baseline_ratios",
                           "verdict"}
    assert report["unavailable"] == [], report["unavailable"]
    for key in ("cpu_count", "torch_threads", "device", "torch", "timm", "batch_size", "crop_size"):
        assert report["conditions"][key] is not None, key

    measured = {(r["stage"], r["mode"], r["backend"]) for r in report["results"]}
    for stage in ("read", "decode", "crops", "recipe", "train"):
        assert (stage, "alone", "") in measured
    assert {("read", "cumulative", ""), ("decode", "cumulative", ""), ("crops", "cumulative", "baseline")} <= measured
    loader_backends = {r["backend"] for r in report["results"] if r["backend"] not in ("", "baseline")}
    assert len(loader_backends) == len(backends)
    for backend in loader_backends:
        for stage in ("crops", "recipe", "train"):
            assert (stage, "cumulative", backend) in measured

    for row in report["results"]:
        rates = row["images_per_s"]
        assert all(positive_finite(rates[k]) for k in ("median", "min", "max")), row
        assert rates["min"] <= rates["median"] <= rates["max"]
        assert positive_finite(row["ms_per_batch"]) and all(positive_finite(s) for s in row["seconds"])
        assert len(row["seconds"]) == TINY["repeats"]
        if row["mode"] == "cumulative":
            assert 0.0 <= row["data_wait_fraction"] <= 1.0
        else:
            assert row["data_wait_fraction"] is None

    assert set(report["baseline_ratios"]) == loader_backends
    assert all(positive_finite(ratio) for ratio in report["baseline_ratios"].values())
    assert report["verdict"]["kind"] in ("model-bound", "data-bound")
    assert isinstance(report["verdict"]["warnings"], list) and report["verdict"]["text"]
    assert positive_finite(report["verdict"]["model_images_per_s"])
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_piece_makes_its_stages_unavailable_not_the_run_fail(sample_shards, monkeypatch):
    def missing(device, seed):
        raise ModuleNotFoundError("No module named 'ecomaug.recipes'")

    monkeypatch.setattr("bench.pieces.build_ecom_recipe", missing)
    config = BenchConfig(shards=str(sample_shards), backends=("torch",), stages=("read", "recipe"), **TINY)
    run = run_benchmark(config, progress=False)
    assert [(u.stage, u.mode) for u in run.unavailable] == [("recipe", "alone"), ("recipe", "cumulative")]
    assert all(u.reason == "not installed: No module named 'ecomaug.recipes'" for u in run.unavailable)
    assert {r.stage for r in run.results} == {"read"}
    assert "unavailable: not installed" in table_text(run)


def _row(stage: str, mode: str, backend: str, rate: float, batch: int = 10) -> StageResult:
    return StageResult(stage, mode, backend, Measurement(stage, batch, [batch / rate] * 3), batch,
                       None if mode == "alone" else 0.5)


def _run(rows: list[StageResult]) -> BenchRun:
    return BenchRun(BenchConfig(shards="unused", model="resnet50"), {}, {}, rows, [])


def test_verdict_names_the_first_data_stage_slower_than_the_model():
    rows = [_row("train", "alone", "", 4100), _row("read", "cumulative", "", 50000),
            _row("decode", "cumulative", "", 2900), _row("crops", "cumulative", "torch", 2600),
            _row("recipe", "cumulative", "torch", 2500), _row("train", "cumulative", "torch", 2400)]
    result = verdict(_run(rows))
    assert result["kind"] == "data-bound" and result["stage"] == "decode"
    assert result["text"] == "data-bound by decode: 2,900 img/s vs model 4,100 img/s"


def test_verdict_skips_a_slow_proxy_stage_that_the_backend_outruns():
    rows = [_row("train", "alone", "", 4100), _row("decode", "cumulative", "", 2000),
            _row("crops", "cumulative", "dali-gpu", 9000), _row("recipe", "cumulative", "dali-gpu", 3000),
            _row("train", "cumulative", "dali-gpu", 2900)]
    result = verdict(_run(rows))
    assert result["stage"] == "recipe" and result["backend"] == "dali-gpu"


def test_verdict_model_bound_judges_the_fastest_backend():
    rows = [_row("train", "alone", "", 400), _row("decode", "cumulative", "", 3000),
            _row("crops", "cumulative", "torch", 300), _row("train", "cumulative", "torch", 250),
            _row("crops", "cumulative", "dali-gpu", 5000), _row("train", "cumulative", "dali-gpu", 380)]
    result = verdict(_run(rows))
    assert result["kind"] == "model-bound" and result["backend"] == "dali-gpu"
    assert "95% of its 400 img/s" in result["text"] and result["warnings"] == []


def test_verdict_warns_about_noisy_figures():
    noisy = StageResult("decode", "cumulative", "", Measurement("decode", 10, [0.01, 0.1, 0.02]), 10, 0.9)
    rows = [_row("train", "alone", "", 100), noisy, _row("train", "cumulative", "torch", 150)]
    warnings = verdict(_run(rows))["warnings"]
    assert len(warnings) == 2 and "1 of 3 rows vary" in warnings[0] and "faster than the model" in warnings[1]


def test_baseline_ratio_is_ours_over_baseline():
    rows = [_row("crops", "cumulative", "baseline", 200), _row("crops", "cumulative", "torch", 500)]
    assert to_json(_run(rows))["baseline_ratios"] == pytest.approx({"torch": 2.5})


def test_cli_writes_json_and_chart(sample_shards, tmp_path):
    result = CliRunner().invoke(cli, ["pipeline", "--shards", str(sample_shards), "--stages", "read,decode",
                                       "--device", "cpu", "--batch-size", "4", "--warmup", "0", "--iters", "1",
                                       "--repeats", "1", "--workers", "1", "--threads", "1", "--out", str(tmp_path),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "tar read (bytes)" in result.output and "verdict:" in result.output
    assert "CPU:" in result.output and "torch threads:" in result.output and "timm " in result.output
    assert json.loads((tmp_path / "bench.json").read_text())["results"]
    assert (tmp_path / "bench.png").is_file()


@pytest.mark.parametrize("arguments, message", [
    (["--stages", "read,bogus"], "unknown stage"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--device", "tpu"], "device"),
    (["--model", "no_such_model"], "unknown timm model"),
])
def test_cli_bad_input_is_one_line_and_exit_2(sample_shards, arguments, message):
    result = CliRunner().invoke(cli, ["pipeline", "--shards", str(sample_shards), "--no-progress", *arguments])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.strip().startswith("Error:")
    assert len(result.output.strip().splitlines()) == 1


def test_every_registered_stage_is_a_click_command_with_help():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0 and all(name in result.output for name in STAGES)
    for name in STAGES:
        command = cli.get_command(click.Context(cli), name)
        assert isinstance(command, click.Command), name
        shown = CliRunner().invoke(cli, [name, "--help"])
        assert shown.exit_code == 0 and "Usage:" in shown.output, (name, shown.output)


def test_an_unknown_stage_is_a_usage_error():
    result = CliRunner().invoke(cli, ["no-such-stage"])
    assert result.exit_code == 2 and "No such command" in result.output


def test_bench_is_a_leaf_nothing_in_ecomaug_or_loaders_imports_it():
    importers = []
    for path in [*(REPO / "ecomaug").rglob("*.py"), *(REPO / "loaders").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name == "bench" or name.startswith("bench.") for name in names):
                importers.append(str(path.relative_to(REPO)))
    assert importers == []


def test_time_stream_pulls_every_batch_and_keeps_the_last():
    stream = iter(range(100))
    measurement, wait, last = time_stream("count", stream, batch_size=4, warmup=1, iters=2, repeats=3)
    assert last == 6 and measurement.items_per_repeat == 8 and len(measurement.seconds) == 3
    assert 0.0 <= wait <= 1.0


def test_time_batches_counts_every_batch_and_the_wait():
    calls = []

    def one_batch() -> float:
        calls.append(1)
        return 0.0

    measurement, wait = time_batches("count", one_batch, batch_size=4, warmup=2, iters=3, repeats=2)
    assert len(calls) == 2 + 3 * 2 and measurement.items_per_repeat == 12 and len(measurement.seconds) == 2
    assert wait == 0.0


def test_gpu_section_smoke_run_on_the_cpu_has_every_row_and_no_verdict(sample_shards):
    from bench.gpu import Settings, run, table

    rows = run(Settings(shards=str(sample_shards), device=torch.device("cpu"), batch_size=4, crop_size=32,
                        model="test_resnet", warmup=1, iters=1, repeats=1, workers=1))
    names = [row.name for row in rows]
    assert names[0] == "torch loader" and "ecom recipe (2 views)" in names and "recipe share of the step" in names
    assert any(name.startswith("MoCo step") for name in names) and names[-1].startswith("step fed by")
    assert any(name.startswith("DALI") for name in names)
    assert all(row.verdict == "n/a" for row in rows)  # goals hold on CUDA only
    assert "pass/fail" in table(rows).splitlines()[0]


def test_fetch_stage_converts_the_same_photos_from_urls_and_files_with_many_fetches_in_flight(tmp_path):
    out = tmp_path / "fetch.json"
    result = CliRunner().invoke(cli, ["fetch", "--count", "6", "--latency-ms", "100", "--workers", "1",
                                      "--repeats", "1", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "URLs / local =" in result.output and "one fetch at a time" in result.output
    report = json.loads(out.read_text())
    assert set(report["rows"]) == {"local", "url", "serial"}
    for name, row in report["rows"].items():
        last = row["last_run"]
        assert last["inputs"] == last["written"] + last["skipped"] == 6 and last["written"] == 6, (name, last)
        assert len(row["seconds"]) == 1 and positive_finite(row["median_per_s"])
        assert [run["requests"] for run in row["server"]] == [0 if name == "local" else 6]
    # the fetch pool asks for all six at once; one fetch thread asks one at a time
    assert report["rows"]["url"]["server"][0]["peak_in_flight"] > 1
    assert report["rows"]["serial"]["server"][0]["peak_in_flight"] == 1
    assert all(run["peak_connections"] >= run["peak_in_flight"] for row in report["rows"].values()
               for run in row["server"])
    assert all(positive_finite(report["ratios"][key]) for key in ("url_over_local", "serial_over_local"))
    assert report["ratios"]["waiting_ceiling_per_s"] == pytest.approx(16 / 0.1)
