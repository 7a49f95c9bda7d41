"""``python -m bench``: the same command as ``ecomaug bench``, with the same one-line errors."""

from __future__ import annotations

import click

from ecomaug.cli import USER_ERRORS, CommandError, one_line
from ecomaug.commands.bench import bench


class _BenchCommand(click.Command):
    """``bench`` outside the ``ecomaug`` group: library errors still become one line, exit 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as error:
            raise CommandError(one_line(error)) from error


command = _BenchCommand(name="bench", params=bench.params, callback=bench.callback, help=bench.help,
                        context_settings={"help_option_names": ["-h", "--help"]})

if __name__ == "__main__":
    command(prog_name="python -m bench")
