"""`wsiuda train` (not yet implemented)."""

from __future__ import annotations

import click

from wsiuda.errors import ConfigError


@click.command(name="train")
def command() -> None:
    """Not yet implemented."""
    raise ConfigError("wsiuda train is not implemented yet")
