"""``ecomaug train``: the engine's command line (:func:`ecomaug.engine.run`), as ``python train.py``."""

from __future__ import annotations

import click


@click.command("train", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                          "help_option_names": []})
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def train(context: click.Context, train_args: tuple[str, ...]) -> None:
    """Train MoCo with a timm backbone (flags as in train.py; `ecomaug train --help` lists them).

    \b
    Examples:
      ecomaug train                                   # the bundled sample on CPU, ~30 s
      ecomaug train --data ./shards --out runs/r50 --preset v100x8
      ecomaug train --data ./shards --out runs/r50 --resume auto
      ecomaug train --config runs/sample/config.json --out runs/again
      ecomaug train --overwrite                       # the sample again, from step 0
      torchrun --nproc_per_node=8 -m ecomaug train --data ./shards --out runs/r50 --preset h100
    """
    from ecomaug.cli import CommandError, one_line
    from ecomaug.engine import NonFiniteLossError, OutOfMemoryError, TrainingAborted, TrainingInterrupted, run

    arguments = list(train_args)
    group_level = (context.obj or {}).get("log_level")
    if group_level and "--log-level" not in arguments:  # `ecomaug --log-level info train ...`
        arguments = ["--log-level", group_level, *arguments]
    try:
        run(arguments, prog="ecomaug train")
    except (NonFiniteLossError, OutOfMemoryError) as error:
        raise CommandError(one_line(error)) from error
    except TrainingInterrupted as stop:  # SIGTERM/SIGINT: checkpoint saved; exit 143/130 as a shell expects
        click.echo(str(stop), err=True)
        raise click.exceptions.Exit(stop.exit_code) from None
    except TrainingAborted as abort:
        click.echo(f"Error: {abort}", err=True)
        raise click.exceptions.Exit(128 + abort.signal_number) from None
