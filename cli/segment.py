"""`wsiuda segment` (not yet implemented)."""

from __future__ import annotations

import click

from wsiuda.errors import ConfigError


@click.command(name="segment")
def command() -> None:
    """Not yet implemented."""
    raise ConfigError("wsiuda segment is not implemented yet")
