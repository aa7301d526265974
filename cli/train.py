"""`wsiuda train`: supervised training only (the source-only method of `wsiuda adapt`)."""

from __future__ import annotations

from typing import Any

import click

from wsiuda.cli.adapt import run_command, training_options


@click.command(name="train")
@training_options
@click.pass_context
def command(ctx: click.Context, **values: Any) -> None:
    """Train S on labelled --source folders, without adaptation (e.g. a target-supervised reference).

    Writes the same run folder as `wsiuda adapt`; model.pt is the input of `wsiuda segment -m`.
    """
    run_command(ctx, values, method="source-only")
