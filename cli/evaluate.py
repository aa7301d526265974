"""`wsiuda evaluate`: score a model on a labelled images/ + masks/ folder."""

from __future__ import annotations

from pathlib import Path

import click

from wsiuda.cli.options import device_option, precision_option


@click.command(name="evaluate")
@click.option(
    "-m",
    "--model",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="model.pt to score (default: the model that ships with wsiuda).",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Labelled folder: images/ and masks/ with matching names (binary 0/255 or instance-label masks).",
)
@click.option(
    "--mpp-of-data",
    "data_mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="µm/px of the folder's images (default: the number in DATA/mpp.txt, else 0.25).",
)
@click.option("--split", default=None, help="Only images whose split.tsv row names this split (e.g. test).")
@click.option("--no-crf", is_flag=True, help="Score the network's output without the dense CRF.")
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.5,
    show_default=True,
    help="Foreground probability threshold.",
)
@device_option()
@precision_option()
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the summary and per-image rows to this JSON file (its config goes beside it).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def command(
    model: Path | None,
    data: Path,
    data_mpp: float | None,
    split: str | None,
    no_crf: bool,
    threshold: float,
    device: str,
    precision: str,
    output: Path | None,
    quiet: bool,
) -> None:
    """Score MODEL on the labelled folder DATA: Dice and IoU (per image, then averaged; and pooled), object F1
    at IoU 0.5, AJI and PQ. Prints a table of every image and the summary."""
    from wsiuda.pipelines.evaluate import EvaluateConfig, evaluate, format_table

    config = EvaluateConfig(
        data=data,
        model=model,
        output=output,
        data_mpp=data_mpp,
        split=split,
        crf=not no_crf,
        threshold=threshold,
        device=device,
        precision=precision,
    )
    evaluation = evaluate(config, progress=not quiet)
    click.echo(format_table(evaluation))
    if output is not None:
        click.echo(f"report written to {output}", err=True)
