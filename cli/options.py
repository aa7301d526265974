"""Option factories shared by several commands, so each option reads and behaves the same everywhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

F = Callable[..., Any]


def mpp_option(default: float = 0.25) -> Callable[[F], F]:
    return click.option(
        "--mpp",
        type=click.FloatRange(min=0, min_open=True),
        default=default,
        show_default=True,
        help="Working resolution in µm/px (0.25 is 40x).",
    )


def slide_mpp_option() -> Callable[[F], F]:
    return click.option(
        "--slide-mpp",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="Level-0 resolution in µm/px, for slides whose metadata lack it.",
    )


def backend_option() -> Callable[[F], F]:
    return click.option(
        "--backend",
        type=click.Choice(["auto", "openslide", "tiffslide"]),
        default="auto",
        show_default=True,
        help="Slide reader for pyramidal files: auto reads TIFF-based slides (SVS, generic TIFF) with "
        "tiffslide and everything else with OpenSlide. Plain images are read directly.",
    )


def device_option() -> Callable[[F], F]:
    return click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help="Where the network runs; auto takes a GPU when one is present.",
    )


def precision_option() -> Callable[[F], F]:
    return click.option(
        "--precision",
        type=click.Choice(["auto", "float32", "int8"]),
        default="auto",
        show_default=True,
        help="Arithmetic of the network: int8 gives the same Dice, faster on a CPU by how much its int8 "
        "instructions allow (2.7x with AVX-512 VNNI); auto uses it on a CPU when the model file carries an "
        "int8 calibration (models from `wsiuda adapt` and the default model do), else float32.",
    )


def overwrite_option() -> Callable[[F], F]:
    return click.option("--overwrite", is_flag=True, help="Redo finished work instead of resuming it.")


def workers_option() -> Callable[[F], F]:
    return click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=None,
        help="Parallel workers (default: the machine's cores).",
    )


def tile_option(default: int = 512, minimum: int = 16) -> Callable[[F], F]:
    return click.option(
        "--tile",
        type=click.IntRange(min=minimum),
        default=default,
        show_default=True,
        help="Tile size in working-grid pixels (at --mpp), without the halo.",
    )


def halo_option(default: int = 32) -> Callable[[F], F]:
    return click.option(
        "--halo",
        type=click.IntRange(min=0),
        default=default,
        show_default=True,
        help="Overlap in pixels added on every side of each tile.",
    )


def min_tissue_option(default: float = 0.1) -> Callable[[F], F]:
    return click.option(
        "--min-tissue",
        type=click.FloatRange(0, 1),
        default=default,
        show_default=True,
        help="Skip tiles whose tissue fraction is below this (0 keeps every tile).",
    )


def failed_count(failed: int, total: int) -> str:
    """The last line of a batch with failed slides, each already reported on a line of its own."""
    if failed == total:
        return f"all {total} slides failed (listed above)"
    return f"{failed} of {total} slides failed (listed above); the others are done"
