"""`wsiuda adapt` (not yet implemented)."""

from __future__ import annotations

import click

from wsiuda.errors import ConfigError


@click.command(name="adapt")
def command() -> None:
    """Not yet implemented."""
    raise ConfigError("wsiuda adapt is not implemented yet")
