"""Choose the dense CRF's parameters for a model on its source validation images; report the held-out figures.

    .venv/bin/python benchmarks/crf_tuning.py            # the shipped default model and its training run

The grid covers the appearance kernel's weight, spatial width and colour width (the smoothness kernel stays
at the paper's w2=3, θγ=3), each at half resolution as ``wsiuda segment`` runs it. The parameters are chosen
on the validation images of the model's training run alone (the groups its ``summary.json`` names, held out
of training): the mean over the validation sets of their per-image Dice, so that each source weighs the same.
The test images (MoNuSeg's official test set, TNBC slides 10-11) are scored for the report only, for no CRF,
the paper's parameters and the chosen ones. Writes ``benchmarks/results/crf_tuning.{md,json}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from wsiuda.config import atomic_write_text
from wsiuda.crf import DEFAULT_CRF, CrfParams
from wsiuda.models import Segmenter
from wsiuda.pipelines.evaluate import LabelledPair, labelled_pairs, score_pairs

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from common import hardware  # noqa: E402

TNBC_TEST_SLIDES = ("slide-10", "slide-11")
GRID = {"w1": (1.0, 3.0, 10.0), "theta_alpha": (5.0, 10.0, 20.0), "theta_beta": (5.0, 13.0)}
# The paper group's parameters, at the resolution segment runs the CRF.
PAPER_CRF = CrfParams(downsample=2)


def grid_variants() -> dict[str, CrfParams | None]:
    variants: dict[str, CrfParams | None] = {"no CRF": None}
    for w1, theta_alpha, theta_beta in itertools.product(*GRID.values()):
        params = CrfParams(
            w1=w1, theta_alpha=theta_alpha, theta_beta=theta_beta, downsample=PAPER_CRF.downsample
        )
        variants[label(params)] = params
    return variants


def label(params: CrfParams) -> str:
    return f"w1={params.w1:g} θα={params.theta_alpha:g} θβ={params.theta_beta:g}"


def mean_dice(rows: list) -> float:  # type: ignore[type-arg]
    return float(np.mean([row.dice for row in rows]))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shared", type=Path, default=Path(os.environ.get("WSIUDA_SHARED", REPO.parent / "shared"))
    )
    parser.add_argument("--model", type=Path, default=REPO / "wsiuda" / "weights" / "default.pt")
    parser.add_argument(
        "--run",
        type=Path,
        default=REPO / "runs" / "default-model" / "run",
        help="The model's training run: its summary.json names the validation groups.",
    )
    args = parser.parse_args()
    for needed in (args.shared / "datasets", args.run / "summary.json"):
        if not needed.exists():
            print(f"Error: {needed} is absent; pass --shared / --run", file=sys.stderr)
            return 2
    val_groups = {
        group for groups in json.loads((args.run / "summary.json").read_text())["source_val_groups"].values()
        for group in groups
    }  # fmt: skip
    tnbc = labelled_pairs(args.shared / "datasets" / "tnbc")
    monuseg = labelled_pairs(args.shared / "datasets" / "monuseg2018")
    validation: dict[str, list[LabelledPair]] = {
        "TNBC validation": [p for p in tnbc if p.group in val_groups],
        "MoNuSeg validation": [p for p in monuseg if p.group in val_groups],
    }
    test: dict[str, list[LabelledPair]] = {
        "MoNuSeg 2018 official test": labelled_pairs(args.shared / "datasets" / "monuseg2018", split="test"),
        "TNBC slides 10-11": [p for p in tnbc if p.group in TNBC_TEST_SLIDES],
    }
    leaked = {p.name for pairs in validation.values() for p in pairs} & {
        p.name for pairs in test.values() for p in pairs
    }
    if leaked or not all(validation.values()):
        print(
            f"Error: validation and test overlap or a validation set is empty: {sorted(leaked)}",
            file=sys.stderr,
        )
        return 2

    started = time.time()
    machine = hardware()
    segmenter = Segmenter.load(args.model, device="auto")
    variants = grid_variants()
    val_scores = {
        name: score_pairs(segmenter, pairs, data_mpp=0.25, variants=variants, progress=False)
        for name, pairs in validation.items()
    }
    val_dice = {
        variant: {name: mean_dice(scores[variant]) for name, scores in val_scores.items()}
        for variant in variants
    }
    # segment's pipeline refines with a CRF (``--no-crf`` skips it): the choice is among CRF settings, and the
    # network alone is scored beside them.
    chosen = max(
        (variant for variant in variants if variants[variant] is not None),
        key=lambda variant: np.mean(list(val_dice[variant].values())),
    )
    paper = label(PAPER_CRF)
    reported = {
        "no CRF": None,
        f"paper ({paper})": PAPER_CRF,
        f"segment's default ({label(DEFAULT_CRF)})": DEFAULT_CRF,
        f"chosen ({chosen})": variants[chosen],
    }
    test_dice = {
        name: {
            variant: mean_dice(rows)
            for variant, rows in score_pairs(
                segmenter, pairs, data_mpp=0.25, variants=reported, progress=False
            ).items()
        }
        for name, pairs in test.items()
    }
    record = {
        "command": "python benchmarks/crf_tuning.py " + shlex.join(sys.argv[1:]),
        "hardware": machine,
        "date": time.strftime("%Y-%m-%d"),
        "minutes": round((time.time() - started) / 60, 1),
        "model": str(args.model.relative_to(REPO)) if args.model.is_relative_to(REPO) else str(args.model),
        "validation_images": {name: [p.name for p in pairs] for name, pairs in validation.items()},
        "validation_dice": val_dice,
        "chosen": chosen,
        "chosen_params": asdict(variants[chosen]) if variants[chosen] is not None else None,
        "test_dice": test_dice,
    }
    results = HERE / "results"
    atomic_write_text(results / "crf_tuning.json", json.dumps(record, indent=2) + "\n")
    sets = list(validation)
    lines = [
        "# Dense CRF parameters for the default model",
        "",
        f"Command: `{record['command']}`. {machine['cpus']} CPU cores ({machine['cpu_model']}), no GPU; "
        f"{machine['note']}; {record['date']}; {record['minutes']} min.",
        "",
        "Chosen on the source validation images of the model's training run "
        f"({', '.join(sorted(val_groups))}; never trained on), by the mean of the two sets' per-image "
        "Dice. Smoothness kernel w2=3, θγ=3,"
        f" 5 iterations, CRF at 1/{PAPER_CRF.downsample} resolution throughout. Threshold 0.5.",
        "",
        "## Validation (chooses)",
        "",
        "| CRF | " + " | ".join(sets) + " | mean |",
        "|---|" + "---:|" * (len(sets) + 1),
    ]
    for variant in sorted(variants, key=lambda v: -np.mean(list(val_dice[v].values()))):
        cells = [f"{val_dice[variant][name]:.4f}" for name in sets]
        mark = " (chosen)" if variant == chosen else " (paper's)" if variant == paper else ""
        lines.append(
            f"| {variant}{mark} | "
            + " | ".join(cells)
            + f" | {np.mean(list(val_dice[variant].values())):.4f} |"
        )
    lines += ["", "## Held-out test sets (reported only)", "", "| CRF | " + " | ".join(test) + " |",
              "|---|" + "---:|" * len(test)]  # fmt: skip
    for variant in reported:
        lines.append(
            f"| {variant} | " + " | ".join(f"{test_dice[name][variant]:.4f}" for name in test) + " |"
        )
    atomic_write_text(results / "crf_tuning.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
