"""The ``python -m bench`` harness: one click group over a registry of benchmark stages.

Each stage is a click command in a module of its own, imported only when it runs, so
``python -m bench --help`` lists every stage without importing torch or DALI. A stage runs the
same way as ``python -m bench <stage>`` or ``python -m bench.<module>``; either way a user's
mistake (a missing file, a bad value) prints one ``Error:`` line and exits with code 2.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import click

from ecomaug.cli import USER_ERRORS, CommandError, is_user_error, one_line

if TYPE_CHECKING:
    import torch

# stage name -> ("module:command", one line for --help). Ordered as the data flows.
STAGES: dict[str, tuple[str, str]] = {
    "corpus": ("bench.corpus:main",
               "real photos to measure on: listing-size JPEGs from Debian's wallpapers, and shards"),
    "convert": ("bench.convert:main", "images -> shards: conversion images/s against this machine's limit"),
    "fetch": ("bench.fetch:main", "URLs -> shards: URL-list conversion images/s vs the same photos as files"),
    "loaders": ("bench.loaders:main", "shards -> pixels: two-view loader images/s, ours vs the baseline"),
    "augment": ("bench.augment:main", "pixels -> views: the ecom recipe's images/s and share of a step"),
    "pipeline": ("bench.pipeline:pipeline", "tar -> MoCo step: every stage alone and cumulative, which limits"),
    "gpu": ("bench.gpu:gpu", "the GPU section: DALI variants, bf16/fp16 steps, recipe share, fed vs synthetic"),
    "moco-reference": ("bench.moco_reference:main", "views -> weights: our MoCo beside lightly's"),
    "view-difficulty": ("bench.view_difficulty:main", "weights -> views: the recipe stage a trained run fails on"),
    "robustness": ("bench.robustness:main", "weights -> recall: held-out recall per disturbance, per recipe"),
    "match": ("bench.match:main", "embeddings -> matches: embed vectors/s, search queries/s, memory"),
    "index-budget": ("bench.index_budget:main",
                     "embeddings -> matches: the index a memory budget allows: size, build, queries/s, recall"),
    "dewatermark-pr": ("bench.dewatermark_pr:main", "watermark detection precision/recall over thresholds"),
}
CONTEXT = {"help_option_names": ["-h", "--help"]}


def write_results(path: Path, record: Any) -> None:
    """A stage's ``--out``: ``record`` as indented JSON at ``path`` (its folder made; what JSON cannot
    hold, such as a device or a path, written as text), and a line saying where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    click.echo(f"wrote {path}")


@contextlib.contextmanager
def user_errors_as_one_line() -> Iterator[None]:
    """Turn a library's user-facing error into click's one ``Error:`` line and exit code 2."""
    try:
        yield
    except (*USER_ERRORS, OSError) as error:
        if not is_user_error(error):
            raise
        raise CommandError(one_line(error)) from error


def parse_device(text: str | None) -> "torch.device":
    """A stage's ``--device``: ``cpu``, ``cuda`` or ``cuda:N``; None: cuda when present.

    The one device rule of every command (:func:`ecomaug.evaluation.models.resolve_device`),
    limited to the CPU and CUDA devices the stages measure.

    Raises:
        ValueError: not a device, not a CPU or CUDA device, or CUDA asked for where there is none.
    """
    from ecomaug.evaluation.models import resolve_device

    device = resolve_device("auto" if text is None else text)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {text!r}")
    return device


class BenchCommand(click.Command):
    """A stage's command: one-line errors also when it runs alone (``python -m bench.<module>``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("context_settings", CONTEXT)
        super().__init__(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        with user_errors_as_one_line():
            return super().invoke(ctx)


class StageGroup(click.Group):
    """The registry as a click group: stages are imported when they run, listed without importing."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(STAGES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in STAGES:
            return None
        module_name, attribute = STAGES[cmd_name][0].split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Stages"):
            formatter.write_dl([(name, summary) for name, (_, summary) in STAGES.items()])

    def invoke(self, ctx: click.Context):
        with user_errors_as_one_line():
            return super().invoke(ctx)


@click.group(cls=StageGroup, context_settings=CONTEXT)
def cli() -> None:
    """Benchmarks: each arrow of bytes -> pixels -> views -> weights -> matches, measured alone.

    \b
    Run one stage; `python -m bench STAGE --help` shows its options and an example:
      python -m bench pipeline --device cpu --model resnet10t --batch-size 16 --crop-size 64
      python -m bench loaders --shards ./shards --batch-size 64
      python -m bench gpu --shards ./shards --device cuda
    """
