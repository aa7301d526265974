"""`wsiuda tile`: slides in, one zarr tile store per slide out."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from wsiuda.cli.options import (
    backend_option,
    failed_count,
    halo_option,
    min_tissue_option,
    mpp_option,
    overwrite_option,
    slide_mpp_option,
    tile_option,
    workers_option,
)


@click.command(name="tile")
# readable=False: an unreadable slide fails on its turn, with its fix, and the rest of the batch goes on.
@click.argument(
    "inputs",
    nargs=-1,
    required=True,
    metavar="SLIDE_OR_DIR...",
    type=click.Path(readable=False, path_type=Path),
)
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder; each slide becomes OUT/<name>.zarr.",
)
@mpp_option()
@slide_mpp_option()
@backend_option()
@tile_option()
@halo_option()
@min_tissue_option()
@click.option(
    "--codec",
    type=click.Choice(["jpeg", "zstd"]),
    default="jpeg",
    show_default=True,
    help="Tile compression: jpeg (lossy, like the slide; see benchmarks/results) or zstd (lossless).",
)
@click.option(
    "--quality",
    type=click.IntRange(1, 100),
    default=None,
    help="JPEG quality (default 90) or zstd level (default 3).",
)
@overwrite_option()
@workers_option()
@click.pass_context
def command(
    ctx: click.Context,
    inputs: tuple[Path, ...],
    out_dir: Path,
    mpp: float,
    slide_mpp: float | None,
    backend: str,
    tile: int,
    halo: int,
    min_tissue: float,
    codec: str,
    quality: int | None,
    overwrite: bool,
    workers: int | None,
) -> None:
    """Extract tissue tiles at --mpp from SLIDE_OR_DIR... into OUT/<name>.zarr (zarr v3), resumably.

    A rerun finishes interrupted stores and skips complete ones; --overwrite redoes them. Bad slides are
    reported (on stderr) and skipped; the exit code is then 1.
    """
    from wsiuda.pipelines.tile import TileConfig, run_tile, summary_line

    config = TileConfig(
        mpp=mpp,
        slide_mpp=slide_mpp,
        backend=backend,
        tile=tile,
        halo=halo,
        min_tissue=min_tissue,
        codec=codec,
        quality=quality,
        workers=workers,
    )
    quiet = bool(ctx.find_root().params.get("quiet"))
    progress = not quiet and sys.stderr.isatty()
    logging.getLogger(__name__).debug("tiling %d input(s) into %s", len(inputs), out_dir)
    results = run_tile(list(inputs), out_dir, config, overwrite=overwrite, progress=progress)
    failed = [r for r in results if r.failed]
    # Failures first, on stderr as errors go: they show where stdout is redirected, and a reader of stdout
    # that stops early (`| head`) cannot keep them from being said.
    for result in failed + [r for r in results if not r.failed]:
        click.echo(summary_line(result), err=result.failed)
    # As `wsiuda segment`: a batch ends with the count; failed slides exit 1, a bad command line 2.
    if failed:
        if len(results) > 1:
            click.echo(
                f"Error: {failed_count(len(failed), len(results))}",
                err=True,
            )
        sys.exit(1)
