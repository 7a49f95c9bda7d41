"""``python -m bench STAGE``: the harness of :mod:`bench.harness`."""

from bench.harness import cli

if __name__ == "__main__":
    cli(prog_name="python -m bench")
