"""`wsiuda evaluate` (not yet implemented)."""

from __future__ import annotations

import click

from wsiuda.errors import ConfigError


@click.command(name="evaluate")
def command() -> None:
    """Not yet implemented."""
    raise ConfigError("wsiuda evaluate is not implemented yet")
