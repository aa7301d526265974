"""Train, score and install the default nucleus segmenter that ships in ``wsiuda/weights/default.pt``.

    .venv/bin/python examples/train_default_model.py --budget-minutes 40 --install

A second call resumes the run (``--lr`` sets the rate it goes on at); the model card lists the calls that
trained the shipped weights.

Training data: TNBC slides 01-09 and MoNuSeg 2018's training images (its split.tsv Train/Val rows); MoNuSeg's
official test images and TNBC slides 10-11 are never read in training and give the held-out figures of the
model card. Model selection uses the source validation split only (held-out slides of the training sources).
The figures are written to ``benchmarks/results/default_model.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from wsiuda.config import atomic_write_text
from wsiuda.crf import DEFAULT_CRF
from wsiuda.data import group_id
from wsiuda.models import ModelMeta, Segmenter, save_model
from wsiuda.pipelines.evaluate import labelled_pairs, score_pairs
from wsiuda.train import AdaptConfig, fit
from wsiuda.train.loop import RunData, calibration_images

REPO = Path(__file__).resolve().parents[1]
TNBC_HELD_OUT_SLIDES = ("slide-10", "slide-11")


def link_tnbc(tnbc: Path, work: Path, *, held_out: bool) -> Path:
    """A folder of symlinks to TNBC's held-out (or training) slides, in the images/ + masks/ layout."""
    out = work / ("tnbc-test" if held_out else "tnbc-train")
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for image in sorted((tnbc / "images").glob("*.png")):
        if (group_id(image.stem) in TNBC_HELD_OUT_SLIDES) != held_out:
            continue
        for sub in ("images", "masks"):
            link = out / sub / image.name
            if not link.exists():
                link.symlink_to((tnbc / sub / image.name).resolve())
    return out


def hardware() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{model}, {os.cpu_count()} cores, {gpu}"


def shipped_copy(model_path: Path, out: Path, calibration: list[np.ndarray]) -> None:
    """Store floating-point weights as fp16 to halve the shipped file (they load back into fp32 layers), with
    the int8 calibration of those rounded weights observed on ``calibration`` (source validation images)."""
    trained = Segmenter.load(model_path, device="cpu")
    rounded = Segmenter.from_network(trained.network.half().float(), trained.meta, device="cpu")
    meta = rounded.calibrated_meta(calibration)
    save_model(out, rounded.network.half(), meta)


def score(
    model: Path, datasets: dict[str, tuple[Path, str | None]]
) -> dict[str, dict[str, dict[str, float]]]:
    results: dict[str, dict[str, dict[str, float]]] = {}
    for precision in ("float32", "int8"):
        segmenter = Segmenter.load(model, device="cpu", precision=precision)
        suffix = "" if precision == "float32" else ", int8"
        for name, (folder, split) in datasets.items():
            pairs = labelled_pairs(folder, split=split)
            per_variant = score_pairs(
                segmenter,
                pairs,
                data_mpp=0.25,
                variants={"network": None, "crf": DEFAULT_CRF},
                progress=False,
            )
            for variant, rows in per_variant.items():
                row = {
                    metric: float(sum(getattr(row, metric) for row in rows) / len(rows))
                    for metric in ("dice", "iou", "aji", "f1", "pq")
                }
                results.setdefault(name, {})[variant + suffix] = {**row, "images": len(rows)}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shared", type=Path, default=Path(os.environ.get("WSIUDA_SHARED", REPO.parent / "shared"))
    )
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "default-model")
    parser.add_argument("--budget-minutes", type=float, default=40.0)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="Adam's learning rate; a resumed run continues at this rate"
    )
    parser.add_argument("--install", action="store_true", help="copy the fp16 weights into wsiuda/weights/")
    parser.add_argument("--score-only", action="store_true", help="score an existing run, do not train")
    args = parser.parse_args()

    tnbc = args.shared / "datasets" / "tnbc"
    monuseg = args.shared / "datasets" / "monuseg2018"
    args.work.mkdir(parents=True, exist_ok=True)
    tnbc_train = link_tnbc(tnbc, args.work, held_out=False)
    tnbc_test = link_tnbc(tnbc, args.work, held_out=True)
    run = args.work / "run"
    config = AdaptConfig(
        source=(tnbc_train, monuseg),  # MoNuSeg's split.tsv keeps its test images out of training
        output=run,
        method="source-only",
        epochs=1000,  # the time budget ends the run
        iters_per_epoch=25,
        batch_size=8,
        patch_size=256,
        stain_aug=True,
        width=args.width,
        bce_weight=1.0,
        lr_s=args.lr,
        seed=args.seed,
        budget_minutes=args.budget_minutes,
        resume=(run / "last.pt").exists() and not args.score_only,
    )
    started = time.time()
    if not args.score_only:
        fit(config, progress=sys.stderr.isatty())
    minutes = (time.time() - started) / 60

    shipped = args.work / "default.pt"
    shipped_copy(run / "model.pt", shipped, calibration_images(RunData(config)))
    figures = score(
        shipped,
        {"MoNuSeg 2018 official test (14)": (monuseg, "test"), "TNBC slides 10-11 (7)": (tnbc_test, None)},
    )
    meta: ModelMeta = Segmenter.load(shipped, device="cpu").meta
    history = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    record = {
        "command": "python examples/train_default_model.py " + shlex.join(sys.argv[1:]),
        "hardware": hardware(),
        "date": time.strftime("%Y-%m-%d"),
        "budget_minutes_this_call": args.budget_minutes,
        "wall_minutes_this_call": round(minutes, 1),
        # A resumed run trains over several calls: the totals come from the run's own log.
        "training_minutes_total": round(sum(row["epoch_seconds"] for row in history) / 60, 1),
        "epochs_logged": len(history),
        "iterations": sum(row["iterations"] for row in history),
        "arch": meta.arch,
        "arch_kwargs": meta.arch_kwargs,
        "file_bytes": shipped.stat().st_size,
        "held_out": figures,
    }
    results = REPO / "benchmarks" / "results"
    atomic_write_text(results / "default_model.json", json.dumps(record, indent=2) + "\n")
    lines = [
        "# Default model: held-out figures",
        "",
        f"Command: `{record['command']}`  ",
        f"Hardware: {record['hardware']}; date {record['date']}; {record['training_minutes_total']} min of "
        f"training in all calls of this run ({record['iterations']} iterations of 8 patches of 256², "
        f"{meta.arch} {meta.arch_kwargs}); "
        f"file {record['file_bytes'] / 1e6:.1f} MB (fp16).",
        "",
        "Per-image means, threshold 0.5. `crf` = dense CRF on the network output, as `wsiuda segment` runs "
        "it by default. `int8`: the network in 8-bit integer arithmetic, as `wsiuda segment` and "
        "`wsiuda evaluate` run it on a CPU (`--precision auto`); its ranges were observed on source "
        "validation images.",
        "",
        "| test set | variant | Dice | IoU | AJI | F1 | PQ |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, variants in figures.items():
        for variant, m in variants.items():
            lines.append(
                f"| {name} | {variant} | {m['dice']:.3f} | {m['iou']:.3f} | {m['aji']:.3f} | {m['f1']:.3f} "
                f"| {m['pq']:.3f} |"
            )
    atomic_write_text(results / "default_model.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.install:
        target = REPO / "wsiuda" / "weights" / "default.pt"
        target.write_bytes(shipped.read_bytes())
        print(f"installed {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
