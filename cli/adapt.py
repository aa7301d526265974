"""`wsiuda adapt`: train a segmenter on labelled source folders, adapting it to unlabelled target data."""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from wsiuda.cli.main import stopped_by
from wsiuda.cli.options import device_option, mpp_option, slide_mpp_option
from wsiuda.train.config import METHODS, AdaptConfig

if TYPE_CHECKING:
    from wsiuda.train.loop import TrainingInterrupted

F = Callable[..., Any]
DEFAULTS = {f.name: f.default for f in dataclasses.fields(AdaptConfig)}


def default(name: str) -> str:
    return f"  [default: {DEFAULTS[name]}]"


def training_options(function: F) -> F:
    """Options shared by `adapt` and `train`; None means "the config's default" (shown in --help)."""
    options: list[Callable[[F], F]] = [
        click.option(
            "--source",
            "source",
            multiple=True,
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="Labelled folder (images/ + masks/, or TNBC's Slide_XX/ + GT_XX/); repeat for several. "
            "Rows of a split.tsv marked test are never read.",
        ),
        click.option("-o", "--output", type=click.Path(path_type=Path), help="New run folder."),
        click.option("--epochs", type=click.IntRange(min=1), help=f"Epochs to train.{default('epochs')}"),
        click.option(
            "--iters-per-epoch",
            type=click.IntRange(min=1),
            help=f"Iterations (batches) per epoch.{default('iters_per_epoch')}",
        ),
        click.option(
            "--batch-size", type=click.IntRange(min=1), help=f"Patches per batch.{default('batch_size')}"
        ),
        click.option(
            "--patch-size",
            type=click.IntRange(min=16),
            help=f"Side of the square training patches.{default('patch_size')}",
        ),
        mpp_option(),
        click.option(
            "--image-mpp",
            type=click.FloatRange(min=0, min_open=True),
            help="µm/px of the images in image folders (slides carry their own); resampled to --mpp  "
            "[default: each folder's mpp.txt, else 0.25]",
        ),
        click.option(
            "--budget-minutes",
            type=click.FloatRange(min=0, min_open=True),
            help="Stop cleanly after this much training time (the partial epoch is validated and saved).",
        ),
        click.option("--seed", type=int, help=f"Seed of every random draw.{default('seed')}"),
        device_option(),
        click.option(
            "--resume",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="Continue the run in this folder (only --epochs, --budget-minutes, --device may change).",
        ),
        click.option(
            "--target-val",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="Labelled target folder whose Dice is reported each epoch; it never chooses the model.",
        ),
        click.option(
            "--init",
            help="scratch, default (the shipped model), or a model.pt to fine-tune  [default: scratch]",
        ),
        click.option(
            "--stain-aug", is_flag=True, help="HED stain, saturation, contrast and brightness jitter."
        ),
        click.option(
            "--width",
            type=click.IntRange(min=1),
            help=f"U-Net base width (16 or 32 on a GPU).{default('width')}",
        ),
        click.option(
            "--depth", type=click.IntRange(min=1), help=f"U-Net depth (levels of pooling).{default('depth')}"
        ),
        click.option(
            "--bce-weight",
            type=click.FloatRange(min=0),
            help="Weight of a BCE term added to Dice in the supervised loss  [default: 0]",
        ),
        click.option(
            "--lr-s", type=click.FloatRange(min=0, min_open=True), help="Adam lr of S  [default: 1e-4]"
        ),
        click.option(
            "--val-fraction",
            type=click.FloatRange(min=0, max=1, max_open=True),
            help="Share of each source's slides/patients held out for validation where split.tsv marks none  "
            f"{default('val_fraction')}",
        ),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def run_command(ctx: click.Context, values: dict[str, Any], *, method: str) -> None:
    """Build the config from the given options (or the resumed run's), train, and report the run folder."""
    from wsiuda.errors import ConfigError
    from wsiuda.pipelines.adapt import resume_config, run_training
    from wsiuda.train.loop import TrainingInterrupted

    given = {
        name: value
        for name, value in values.items()
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    progress = not values.pop("no_progress") and not ctx.find_root().params.get("quiet", False)
    given.pop("no_progress", None)
    resume = given.pop("resume", None)
    if resume is not None:
        config = resume_config(resume, **given)
    else:
        if not values.get("source"):
            raise ConfigError("pass --source (a labelled folder), or --resume RUN/ to continue a run")
        if values.get("output") is None:
            raise ConfigError("pass -o RUN/ (a new folder for the run)")
        flags = {
            "no_em": given.pop("no_em", False),
            "no_self_ensembling": given.pop("no_self_ensembling", False),
        }
        fields = {f.name for f in dataclasses.fields(AdaptConfig)}
        kwargs = {name: value for name, value in given.items() if name in fields}
        kwargs |= {"source": values["source"], "output": values["output"], "method": method}
        kwargs["mpp"] = values["mpp"]
        kwargs["device"] = values["device"]
        if flags["no_em"]:
            kwargs["em_weight"] = 0.0
        if flags["no_self_ensembling"]:
            kwargs["consistency_k"] = 0.0
        config = AdaptConfig(**kwargs)
    try:
        run = run_training(config, progress=progress)
    except TrainingInterrupted as interrupted:
        # Said here, where the command and the run folder are known; exiting (rather than re-raising)
        # keeps the command group from adding its generic line.
        word, code = stopped_by(interrupted)
        changes = given if resume is not None else {}
        message = interrupted_message(
            interrupted, stopped=word, command=str(ctx.command.name), changes=changes
        )
        click.echo(message, err=True)
        ctx.exit(code)
    click.echo(f"model: {run / 'model.pt'}")


def interrupted_message(
    interrupted: TrainingInterrupted, *, stopped: str, command: str, changes: dict[str, Any]
) -> str:
    """One line: what the stopped run keeps, and the command that goes on from there. A resumed run's
    changes (--epochs and the like) are not saved in its config.yaml, so the command repeats them."""
    if interrupted.epoch is None:
        return f"{stopped} before the first epoch ended; nothing was kept: run the same command again"
    words = ["wsiuda", command, "--resume", str(interrupted.run)]
    for name, value in changes.items():
        words += [f"--{name.replace('_', '-')}", str(value)]
    return f"{stopped}; epoch {interrupted.epoch} is kept: go on with `{shlex.join(words)}`"


@click.command(name="adapt")
@training_options
@click.option(
    "--target",
    "target",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="Unlabelled target: a folder of images, a folder of slides, or a slide; repeat for several.",
)
@click.option(
    "--method", type=click.Choice(METHODS), default="ours", show_default=True, help="Training method."
)
@slide_mpp_option()
@click.option("--no-em", is_flag=True, help="Ablation of ours: no entropy-minimisation term.")
@click.option("--no-self-ensembling", is_flag=True, help="Ablation of ours: no rot/flip consistency term.")
@click.option(
    "--em-on",
    type=click.Choice(["source", "target", "both"]),
    help="Predictions the entropy term applies to  [default: source, as the paper's Eq. 2]",
)
@click.option("--d-width", type=click.IntRange(min=1), help="Discriminator base width  [default: 32]")
@click.option(
    "--ramp-peak",
    "consistency_peak",
    type=click.FloatRange(min=0),
    help="Epoch at which the self-ensembling weight peaks (the paper's e)  [default: 30]",
)
@click.pass_context
def command(ctx: click.Context, **values: Any) -> None:
    """Train S on labelled --source folders and adapt it to unlabelled --target data.

    Writes RUN/config.yaml, metrics.jsonl, training_curve.png, last.pt (to --resume) and model.pt (the
    weights with the best source-validation Dice, for `wsiuda segment -m`).
    """
    run_command(ctx, values, method=values.pop("method"))
