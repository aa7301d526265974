"""Score a segmenter on a labelled folder (``images/`` + ``masks/``): whole-image prediction, CRF, metrics.

Each image is resampled from the folder's resolution to the model's, predicted whole (1000² fits in memory),
optionally refined by the dense CRF on the model's grid, resampled back to the mask's grid, thresholded and
scored there against the mask as stored (binary masks become nuclei by connected components; instance label
maps keep their nuclei). The folder's resolution is, in order: the configured ``data_mpp``, the number in the
folder's ``mpp.txt``, or 0.25 µm/px (40x).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from wsiuda._version import __version__
from wsiuda.config import (
    atomic_write_text,
    check_finite,
    check_precision,
    config_to_dict,
    prepare_output_folder,
    save_config,
)
from wsiuda.crf import DEFAULT_CRF, CrfParams, dense_crf
from wsiuda.data import (
    find_pairs,
    group_id,
    images_mpp,
    read_label_map,
    read_rgb,
    read_split_table,
    resample_pair,
)
from wsiuda.errors import ConfigError, DataError, OutputError
from wsiuda.geometry import scale_factor
from wsiuda.metrics import ImageScores, Summary, score_image, summarize
from wsiuda.models import Segmenter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """What ``wsiuda evaluate`` scores, and how."""

    data: Path
    model: Path | None = None
    """A model.pt; None takes the model that ships with wsiuda."""
    output: Path | None = None
    """The JSON report; its config is saved beside it as <stem>.config.yaml."""
    data_mpp: float | None = None
    """µm/px of the folder's images; None reads the folder's mpp.txt, else 0.25."""
    split: str | None = None
    """Only images whose split.tsv row contains this word (e.g. "test"); None scores every image."""
    crf: bool = True
    threshold: float = 0.5
    device: str = "auto"
    precision: str = "auto"
    """float32, int8 (CPU) or auto (int8 on a CPU where the model carries its calibration), as in segment."""

    def __post_init__(self) -> None:
        check_finite(self)
        object.__setattr__(self, "data", Path(self.data))
        if self.model is not None:
            object.__setattr__(self, "model", Path(self.model))
        if self.output is not None:
            object.__setattr__(self, "output", Path(self.output))
        if self.data_mpp is not None and not self.data_mpp > 0:
            raise ConfigError(f"--mpp-of-data must be positive, got {self.data_mpp}")
        check_precision(self.precision)
        if not 0 < self.threshold < 1:
            raise ConfigError(f"threshold must be between 0 and 1, got {self.threshold}")
        if self.split is not None and not self.split.strip():
            raise ConfigError("--split must name a split of split.tsv (e.g. test)")
        if self.output is not None and self.output.suffix.lower() != ".json":
            raise ConfigError(f"-o {self.output}: the report is JSON; give it a .json name")


@dataclass(frozen=True)
class LabelledPair:
    """An image file and its mask file in a labelled folder."""

    name: str
    group: str
    image: Path
    mask: Path


@dataclass(frozen=True)
class Evaluation:
    """Per-image scores and their summary, with the resolutions they were computed at."""

    summary: Summary
    rows: tuple[ImageScores, ...]
    groups: tuple[str, ...]
    data_mpp: float
    model_mpp: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_mpp": self.data_mpp,
            "model_mpp": self.model_mpp,
            "summary": self.summary.as_dict(),
            "images": [{"group": g, **row.as_dict()} for g, row in zip(self.groups, self.rows, strict=True)],
        }


def labelled_pairs(root: Path, *, split: str | None = None) -> list[LabelledPair]:
    """The (image, mask) pairs of a labelled folder, optionally only those of one split in its split.tsv."""
    pairs = [LabelledPair(image.stem, group_id(image.stem), image, mask) for image, mask in find_pairs(root)]
    if split is None:
        return pairs
    table = read_split_table(root)
    if not table:
        raise DataError(f"{root}: --split {split} needs a split.tsv (name<TAB>split per line) in the folder")
    kept = [p for p in pairs if split.lower() in table.get(p.name, "").lower()]
    if not kept:
        names = ", ".join(sorted(set(table.values())))
        raise DataError(f"{root}: no image of split.tsv is in split {split!r} (its splits: {names})")
    return kept


def resolve_data_mpp(root: Path, data_mpp: float | None) -> float:
    """The configured resolution, else the folder's mpp.txt, else 0.25 µm/px."""
    return images_mpp(root, data_mpp)


def predict_probabilities(
    segmenter: Segmenter,
    image: np.ndarray,
    *,
    data_mpp: float,
    variants: Mapping[str, CrfParams | None],
) -> dict[str, np.ndarray]:
    """Foreground probability on the image's own grid, once per variant (None: the network's, else CRF'd).

    The network (and the CRF, whose kernel widths are in working pixels) run at the model's mpp.
    """
    factor = scale_factor(data_mpp, segmenter.meta.mpp)
    working, _ = resample_pair(image, None, factor)
    probability = segmenter.predict(working[None], batch_size=1)[0]
    height, width = image.shape[:2]
    out = {}
    for name, params in variants.items():
        refined = probability if params is None else dense_crf(working, probability, params)
        if refined.shape != (height, width):
            refined = cv2.resize(refined, (width, height), interpolation=cv2.INTER_LINEAR)
        out[name] = np.asarray(refined, dtype=np.float32)
    return out


def score_pairs(
    segmenter: Segmenter,
    pairs: Sequence[LabelledPair],
    *,
    data_mpp: float,
    variants: Mapping[str, CrfParams | None],
    threshold: float = 0.5,
    progress: bool = True,
) -> dict[str, list[ImageScores]]:
    """Per-image scores of each variant; the network runs once per image whatever the number of variants."""
    scores: dict[str, list[ImageScores]] = {name: [] for name in variants}
    bar = tqdm(
        pairs, desc="evaluate", unit="image", file=sys.stderr, disable=not progress or not sys.stderr.isatty()
    )
    for pair in bar:
        image, truth = read_rgb(pair.image), read_label_map(pair.mask)
        if image.shape[:2] != truth.shape:
            raise DataError(
                f"{pair.image} is {image.shape[1]}x{image.shape[0]} but its mask {pair.mask} is "
                f"{truth.shape[1]}x{truth.shape[0]}; they must be the same size"
            )
        probabilities = predict_probabilities(segmenter, image, data_mpp=data_mpp, variants=variants)
        for name, probability in probabilities.items():
            scores[name].append(score_image(probability >= threshold, truth, name=pair.name))
    return scores


def evaluate(
    config: EvaluateConfig, *, segmenter: Segmenter | None = None, progress: bool = True
) -> Evaluation:
    """Score ``config.model`` (or a segmenter in memory) on ``config.data``; write the report if asked."""
    if config.output is not None:
        check_output(config.output)
    pairs = labelled_pairs(config.data, split=config.split)
    data_mpp = resolve_data_mpp(config.data, config.data_mpp)
    if segmenter is None:
        segmenter = (
            Segmenter.load_default(device=config.device, precision=config.precision)
            if config.model is None
            else Segmenter.load(config.model, device=config.device, precision=config.precision)
        )
    log.info(
        "scoring %d images of %s (at %g µm/px) with a %s model at %g µm/px%s",
        len(pairs), config.data, data_mpp, segmenter.meta.method, segmenter.meta.mpp,
        ", CRF on" if config.crf else "",
    )  # fmt: skip
    variant = "crf" if config.crf else "network"
    rows = score_pairs(
        segmenter,
        pairs,
        data_mpp=data_mpp,
        variants={variant: DEFAULT_CRF if config.crf else None},
        threshold=config.threshold,
        progress=progress,
    )[variant]
    evaluation = Evaluation(
        summary=summarize(rows),
        rows=tuple(rows),
        groups=tuple(p.group for p in pairs),
        data_mpp=data_mpp,
        model_mpp=segmenter.meta.mpp,
    )
    if config.output is not None:
        write_report(evaluation, config, segmenter, config.output)
    return evaluation


def check_output(path: Path) -> None:
    """Fail before any work when the report cannot be written."""
    prepare_output_folder(path.parent)
    if path.is_dir():
        raise OutputError(f"-o {path} is a folder; give the report a file name such as report.json")


def config_path(report: Path) -> Path:
    return report.with_name(report.stem + ".config.yaml")


def write_report(evaluation: Evaluation, config: EvaluateConfig, segmenter: Segmenter, path: Path) -> None:
    """The JSON report (config, model, summary, per-image rows) and the config YAML beside it."""
    document = {
        "command": "evaluate",
        "wsiuda_version": __version__,
        "config": config_to_dict(config),
        "model": {"path": str(config.model or "default"), "method": segmenter.meta.method},
        **evaluation.to_dict(),
    }
    save_config(config, config_path(path), command="evaluate")
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")


def format_table(evaluation: Evaluation) -> str:
    """A plain-text table: one row per image, then the mean, std over images and pooled scores."""
    header = f"{'image':<28} {'Dice':>6} {'IoU':>6} {'F1':>6} {'AJI':>6} {'PQ':>6} {'true':>5} {'pred':>5}"
    lines = [header, "-" * len(header)]
    for row in evaluation.rows:
        lines.append(
            f"{row.name[:28]:<28} {row.dice:6.3f} {row.iou:6.3f} {row.f1:6.3f} {row.aji:6.3f} {row.pq:6.3f} "
            f"{row.n_true:5d} {row.n_pred:5d}"
        )
    s = evaluation.summary
    lines.append("-" * len(header))
    lines.append(f"{'mean':<28} {s.dice:6.3f} {s.iou:6.3f} {s.f1:6.3f} {s.aji:6.3f} {s.pq:6.3f}")
    stds = (s.dice_std, s.iou_std, s.f1_std, s.aji_std, s.pq_std)
    lines.append(f"{'std over images':<28} " + " ".join(f"{v:6.3f}" for v in stds))
    lines.append(f"{'pooled':<28} {s.pooled_dice:6.3f} {s.pooled_iou:6.3f} {s.pooled_f1:6.3f}")
    return "\n".join(lines)
