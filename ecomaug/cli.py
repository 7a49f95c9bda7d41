"""The ``ecomaug`` console script: one click group, one module per subcommand.

Subcommands are imported only when they run, so ``ecomaug shard`` does not pay for importing
timm or DALI. Library code raises; this module turns those errors into one line and exit code 2.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util

import click

from ecomaug.logs import LEVELS, configure_logging, report_repeats

# name -> "module:attribute" of a click.Command. A subcommand appears once its module exists.
COMMANDS: dict[str, str] = {
    "shard": "ecomaug.commands.shard:shard",
    "dewatermark": "ecomaug.commands.dewatermark:dewatermark",
    "preview": "ecomaug.commands.preview:preview",
    "train": "ecomaug.commands.train:train",
    "export": "ecomaug.commands.export:export",
    "embed": "ecomaug.commands.embed:embed",
    "eval": "ecomaug.commands.evaluate:evaluate",
    "match": "ecomaug.commands.match:match",
}

# Errors that mean "the user asked for something that cannot be done": one line, exit 2.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError, ImportError)
# A full disk (or quota) is the user's to fix too; other OSErrors (an I/O error) keep their traceback.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# So is an output place that cannot be written: a read-only file system (a plain OSError, unlike
# PermissionError), a path too long, a loop of symbolic links.
UNWRITABLE = (errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP)
# What a shell reports for a process Ctrl-C ended (128 + SIGINT).
INTERRUPTED_EXIT_CODE = 130
INTERRUPTED_MESSAGE = "Error: interrupted by SIGINT (Ctrl-C); files already written are kept"


def is_user_error(error: BaseException) -> bool:
    """True for what :data:`USER_ERRORS` lists, a full disk and an unwritable output place."""
    return isinstance(error, USER_ERRORS) or (isinstance(error, OSError)
                                              and error.errno in (*DISK_FULL, *UNWRITABLE))


class CommandError(click.ClickException):
    """A user-facing failure: printed as ``Error: <message>`` with exit code 2."""

    exit_code = 2


class LazyGroup(click.Group):
    """A click group that imports each subcommand's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, target in COMMANDS.items()
                if importlib.util.find_spec(target.split(":")[0]) is not None]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None or cmd_name not in self.list_commands(ctx):
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as error:  # an option out of its range: one line, not click's usage block
            where = error.ctx.command_path if error.ctx is not None else ctx.command_path
            raise CommandError(f"{error.format_message()} (`{where} --help` lists the options)") from error
        except (*USER_ERRORS, OSError) as error:
            if not is_user_error(error):
                raise
            raise CommandError(one_line(error)) from error
        except KeyboardInterrupt:  # click would print "Aborted!" and exit 1; a shell expects 130
            click.echo(INTERRUPTED_MESSAGE, err=True)
            raise click.exceptions.Exit(INTERRUPTED_EXIT_CODE) from None


def one_line(error: BaseException) -> str:
    """Render an exception as a single line (the first line of its message)."""
    text = str(error).strip() or type(error).__name__
    if type(error) is OSError and error.errno in DISK_FULL:  # a raw ENOSPC: say it plainly, and where
        where = f" while writing {error.filename}" if error.filename else ""
        text = f"disk full{where}: {error.strerror or 'no space left on device'}"
    if (isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                           FileExistsError)) or type(error) is OSError and error.errno in UNWRITABLE) \
            and error.filename:
        text = f"{error.strerror or type(error).__name__}: {error.filename}"
    return text.splitlines()[0]


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ecomaug")
@click.option("--log-level", type=click.Choice(LEVELS, case_sensitive=False), default="warning",
              show_default=True, help="Messages shown on stderr; info adds the backend choice, the shard "
                                      "check and the queue cut.")
@click.pass_context
def main(context: click.Context, log_level: str) -> None:
    """ecomaug: shards, loaders, augmentations and MoCo training for e-commerce item matching.

    \b
    Example, from a folder of listing images to a trained embedding; the finetune preset
    (pretrained Lite0, 128 px, batch 32) fits a CPU and a few hundred images, ~1-2 s a step:
      ecomaug shard ./images ./shards --max-size 320
      ecomaug train --data ./shards --out ./runs/first --preset finetune
      ecomaug --log-level info embed --model ./runs/first/export --data ./shards --out emb/first
    """
    configure_logging(log_level)
    context.obj = {"log_level": log_level.lower()}
    context.call_on_close(report_repeats)


if __name__ == "__main__":
    main()
