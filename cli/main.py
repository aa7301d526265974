"""The ``wsiuda`` command group.

Subcommands are imported only when invoked, so ``wsiuda --help`` stays fast and a heavy import (torch, dask)
is paid only by the command that needs it.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from typing import Any

import click

from wsiuda import __version__
from wsiuda.allocator import collect_garbage_less_often, reuse_freed_memory
from wsiuda.errors import WsiudaError

# command name -> (module under wsiuda.cli, one-line help shown by `wsiuda --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "tile": ("tile", "Extract tissue tiles at a target mpp from slides into zarr stores."),
    "adapt": ("adapt", "Train a segmenter on labelled source patches, adapting to unlabelled target slides."),
    "train": ("train", "Train a segmenter supervised only (adapt --method source-only)."),
    "segment": ("segment", "Segment nuclei in slides and write GeoJSON that QuPath imports."),
    "evaluate": ("evaluate", "Score a model on a labelled images/ + masks/ folder."),
}

# What a command interrupted with Ctrl-C keeps, and how to go on from there.
ON_INTERRUPT: dict[str, str] = {
    "tile": "finished tiles are kept: run the same command again to go on",
    "segment": "finished tiles are kept: run the same command again to go on",
    # Once training has started, adapt and train say themselves what the run folder keeps (cli/adapt.py).
    "adapt": "training had not started; run the same command again",
    "train": "training had not started; run the same command again",
    "evaluate": "no report was written",
}
INTERRUPTED_EXIT_CODE = 130
"""128 + SIGINT, as shells report a command that Ctrl-C stopped."""
TERMINATED_EXIT_CODE = 143
"""128 + SIGTERM, as shells report a command that SIGTERM stopped."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, as a batch scheduler (Slurm, a container's stop) sends it before killing a job: stopped as
    Ctrl-C stops a command, through the same clean-up, so that what is finished is kept and resumable."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def stopped_by(interrupt: BaseException) -> tuple[str, int]:
    """("Interrupted", 130) for a Ctrl-C, ("Terminated", 143) for a SIGTERM, also where another
    KeyboardInterrupt was raised from it: how the command's last line starts, and its exit code."""
    if isinstance(interrupt, Terminated) or isinstance(interrupt.__cause__, Terminated):
        return "Terminated", TERMINATED_EXIT_CODE
    return "Interrupted", INTERRUPTED_EXIT_CODE


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module = importlib.import_module(f"wsiuda.cli.{COMMANDS[cmd_name][0]}")
        command: click.Command = module.command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except WsiudaError as error:
            # A user's mistake: one line, no traceback.
            click.echo(f"Error: {error}", err=True)
            sys.exit(2)
        except click.UsageError as error:
            # An option's value or a command's name: one line, with where to read more, not click's three.
            command = f"wsiuda {error.ctx.info_name}" if error.ctx and error.ctx.parent else "wsiuda"
            click.echo(f"Error: {error.format_message().rstrip('.')}; see `{command} --help`.", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt as interrupt:
            word, code = stopped_by(interrupt)
            hint = ON_INTERRUPT.get(ctx.invoked_subcommand or "")
            click.echo(f"{word}; {hint}." if hint else f"{word}.", err=True)
            sys.exit(code)


class _Formatter(logging.Formatter):
    """Warnings and errors as a user reads them ("Error: slide.svs has no mpp; pass ..."), one line each;
    the rest with the logger's name, for whoever asked for more (-v)."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING and not record.exc_info:
            return f"{record.levelname.capitalize()}: {record.getMessage()}"
        return super().format(record)


def configure_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter())
    root = logging.getLogger("wsiuda")
    root.handlers[:] = [handler]
    root.setLevel(level)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsiuda")
@click.option("-v", "--verbose", count=True, help="More log output (-v: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Segment cell nuclei in H&E whole-slide images, and adapt the segmenter to new slides without labels."""
    configure_logging(-1 if quiet else verbose)


def main() -> None:
    """The console script: :data:`cli` in a process whose malloc reuses freed memory
    (:mod:`wsiuda.allocator`), then a prompt exit.

    Once the command has returned, every output is closed and flushed. Python's ordinary shutdown then
    spends most of a second tearing torch down, a real share of a small slide's run, so the process
    flushes its streams and exits at once. Library callers and tests use :data:`cli`, which exits normally.
    """
    # The process is the command's own: its malloc may keep freed memory for the next tiles, and its
    # garbage collector may wait longer between runs.
    reuse_freed_memory()
    collect_garbage_less_often()
    signal.signal(signal.SIGTERM, _raise_terminated)
    code: int | str | None = 0
    try:
        cli()
    except SystemExit as exit_request:  # click ends every run with one
        code = exit_request.code
    if isinstance(code, str):  # as Python does with SystemExit("message")
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
