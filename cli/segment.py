"""`wsiuda segment`: nuclei of whole slides as GeoJSON that QuPath imports."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace

import click

from wsiuda.cli.options import (
    backend_option,
    device_option,
    failed_count,
    min_tissue_option,
    overwrite_option,
    precision_option,
    slide_mpp_option,
    tile_option,
)

log = logging.getLogger("wsiuda.cli.segment")


@click.command(name="segment")
# readable=False: an unreadable slide fails on its turn, with its fix, and the rest of the batch goes on.
@click.argument("inputs", nargs=-1, required=True, type=click.Path(readable=False, path_type=str))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=str),
    help="A .geojson or .geojson.gz file (one slide), or a folder (any number of slides).",
)
@click.option(
    "-m", "--model", type=click.Path(path_type=str), default=None, help="model.pt from `wsiuda adapt`."
)
@device_option()
@precision_option()
@click.option("--no-crf", "no_crf", is_flag=True, help="Skip the dense CRF refinement (faster).")
@click.option(
    "--crf-downsample",
    type=click.FloatRange(min=1),
    default=None,
    help="Run the CRF on a grid this many times coarser, kernels scaled to match (1: full resolution) "
    "[default: 2.5].",
)
@click.option(
    "--mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Working resolution in µm/px [default: the model's].",
)
@click.option(
    "--nuclei-mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Grid on which nuclei are labelled, split and outlined, in µm/px: a whole multiple of the "
    "working one [default: the multiple nearest 0.5].",
)
@slide_mpp_option()
@backend_option()
@tile_option(default=1024, minimum=64)  # SegmentConfig's minimum (a test checks they agree)
@min_tissue_option(default=0.05)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Tiles per network batch [default: 1 on a CPU, 4 on a GPU].",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Local workers [default: one per 2 cores, as far as memory allows; each is given 2.25 GB; "
    "a lone worker runs in this process].",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS",
    help="Run on an existing dask.distributed cluster (e.g. tcp://host:8786); 'sync' runs in this process.",
)
@click.option("--gzip", "gzip_output", is_flag=True, help="With a folder as -o, write .geojson.gz files.")
@overwrite_option()
def command(
    inputs: tuple[str, ...],
    output: str,
    model: str | None,
    device: str,
    precision: str,
    no_crf: bool,
    crf_downsample: float | None,
    mpp: float | None,
    nuclei_mpp: float | None,
    slide_mpp: float | None,
    backend: str,
    tile: int,
    min_tissue: float,
    batch_size: int | None,
    workers: int | None,
    scheduler: str | None,
    gzip_output: bool,
    overwrite: bool,
) -> None:
    """Segment nuclei in SLIDE... and write GeoJSON for QuPath.

    Each input is a slide (any format the backend reads), a tile store from `wsiuda tile`, or a folder of
    slides or images. With -o NAME.geojson (one slide) the other outputs sit beside it: NAME.mask.zarr,
    NAME.overlay.png, NAME.summary.json and NAME.segment.yaml. With -o FOLDER each slide gets
    FOLDER/<slide>.geojson and the rest, and FOLDER/segment.yaml records the settings.

    An interrupted run resumes where it stopped; --overwrite redoes finished slides. A slide that cannot
    be read is reported and the others go on; the exit code is then 1.
    """
    from wsiuda.crf import DEFAULT_CRF
    from wsiuda.pipelines.segment import SegmentConfig, segment

    config = SegmentConfig(
        inputs=tuple(inputs),
        output=output,
        model=model,
        device=device,
        precision=precision,
        crf=not no_crf,
        crf_params=DEFAULT_CRF if crf_downsample is None else replace(DEFAULT_CRF, downsample=crf_downsample),
        mpp=mpp,
        nuclei_mpp=nuclei_mpp,
        slide_mpp=slide_mpp,
        backend=backend,
        tile=tile,
        min_tissue=min_tissue,
        batch_size=batch_size,
        workers=workers,
        scheduler=scheduler,
        overwrite=overwrite,
        gzip=gzip_output,
    )
    quiet = logging.getLogger("wsiuda").getEffectiveLevel() > logging.INFO
    report = segment(config, progress=not quiet)
    for result in report.results:
        if result.error is None:
            state = "already done" if result.skipped else f"{result.nuclei} nuclei"
            click.echo(f"{result.source}: {state} → {result.geojson}")
    # Each failed slide was reported on one line as it failed (the pipeline logs it); a batch ends with
    # the count, as `wsiuda tile` does.
    if report.failures:
        if len(report.results) > 1:
            click.echo(
                f"Error: {failed_count(len(report.failures), len(report.results))}",
                err=True,
            )
        sys.exit(1)
