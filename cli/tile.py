"""`wsiuda tile` (not yet implemented)."""

from __future__ import annotations

import click

from wsiuda.errors import ConfigError


@click.command(name="tile")
def command() -> None:
    """Not yet implemented."""
    raise ConfigError("wsiuda tile is not implemented yet")
