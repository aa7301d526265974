"""Scores of a predicted nucleus mask against a ground truth: pixel Dice/IoU, instance F1, AJI and PQ.

Pixel scores follow the paper (Dice and IoU per image, then averaged over images); the pooled Dice sums the
pixel counts of every image first, so large images weigh more. Instance scores need labelled nuclei: a binary
mask becomes instances by connected components (8-connectivity), an instance label map (two or more distinct
non-zero values) is used as it is (see :func:`to_instances`).

Conventions where a ratio would be 0/0: a prediction and a ground truth that are both empty agree perfectly
and score 1.0 on every metric; an empty side facing a non-empty one scores 0.0.

Pure numpy/scipy: no torch, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy import ndimage

# A match needs IoU strictly above this, which makes one-to-one matching unique without an assignment solver
# (two objects of one image cannot both overlap a third by more than half of their union).
MATCH_IOU = 0.5

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def to_instances(mask: np.ndarray) -> np.ndarray:
    """Nuclei labelled 1..n (int32, 0 background) from a binary mask or an instance label map.

    A boolean array, or one with at most one distinct non-zero value (0/1, 0/255), is binary: its connected
    components (8-connectivity) become the instances. Anything with two or more distinct non-zero values is an
    instance label map and keeps its objects (relabelled to 1..n, in order of their ids).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
    if mask.dtype == bool:
        return _components(mask)
    ids = np.unique(mask)
    ids = ids[ids != 0]
    if ids.size <= 1:
        return _components(mask != 0)
    # Sequential relabelling: searchsorted maps each id to its rank among the sorted non-zero ids.
    labels = np.zeros(mask.shape, dtype=np.int32)
    foreground = mask != 0
    labels[foreground] = np.searchsorted(ids, mask[foreground]).astype(np.int32) + 1
    return labels


def _components(binary: np.ndarray) -> np.ndarray:
    labels, _ = ndimage.label(binary, structure=_EIGHT_CONNECTED)
    return labels.astype(np.int32, copy=False)


@dataclass(frozen=True)
class Overlaps:
    """Areas of every predicted and true object, and the intersection of every overlapping pair.

    Objects are numbered 1..n in their label maps; ``pred_area[k]`` is the area of predicted object k+1.
    The pair arrays list only pairs that share at least one pixel (a sparse overlap table).
    """

    pred_area: np.ndarray
    true_area: np.ndarray
    pair_pred: np.ndarray  # 0-based index into pred_area
    pair_true: np.ndarray  # 0-based index into true_area
    pair_intersection: np.ndarray

    @property
    def pair_union(self) -> np.ndarray:
        return self.pred_area[self.pair_pred] + self.true_area[self.pair_true] - self.pair_intersection

    @property
    def pair_iou(self) -> np.ndarray:
        return self.pair_intersection / self.pair_union


def overlaps(pred_labels: np.ndarray, true_labels: np.ndarray) -> Overlaps:
    """The sparse overlap table of two instance label maps (labels 1..n, 0 background, same shape)."""
    if pred_labels.shape != true_labels.shape:
        raise ValueError(f"prediction {pred_labels.shape} and ground truth {true_labels.shape} differ")
    pred = pred_labels.ravel().astype(np.int64)
    true = true_labels.ravel().astype(np.int64)
    n_pred = int(pred.max(initial=0))
    n_true = int(true.max(initial=0))
    pred_area = np.bincount(pred, minlength=n_pred + 1)[1:]
    true_area = np.bincount(true, minlength=n_true + 1)[1:]
    both = (pred > 0) & (true > 0)
    codes, counts = np.unique(pred[both] * (n_true + 1) + true[both], return_counts=True)
    return Overlaps(
        pred_area=pred_area,
        true_area=true_area,
        pair_pred=codes // (n_true + 1) - 1,
        pair_true=codes % (n_true + 1) - 1,
        pair_intersection=counts,
    )


@dataclass(frozen=True)
class ImageScores:
    """Every score of one image, plus the counts that pooled scores are built from."""

    name: str
    dice: float
    iou: float
    f1: float  # object F1 at IoU > 0.5 (equals PQ's detection quality)
    precision: float
    recall: float
    aji: float
    pq: float
    sq: float  # PQ's segmentation quality: mean IoU of matched pairs
    n_true: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    intersection: int  # foreground pixels
    pred_pixels: int
    true_pixels: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(numerator: float, denominator: float) -> float:
    # 0/0 only happens when both sides are empty: perfect agreement.
    return 1.0 if denominator == 0 else float(numerator) / float(denominator)


def dice_iou(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """Pixel Dice and IoU of two masks (non-zero is foreground)."""
    p, t = np.asarray(pred) != 0, np.asarray(true) != 0
    inter = int(np.count_nonzero(p & t))
    sizes = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    return _ratio(2 * inter, sizes), _ratio(inter, sizes - inter)


def aji(table: Overlaps) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017).

    Each true object is paired with the prediction of highest IoU with it (a prediction may serve several true
    objects, as in the original definition); a true object that no prediction touches adds only its own area
    to the union; predictions never paired add their area to the union.
    """
    n_true, n_pred = table.true_area.size, table.pred_area.size
    if n_true == 0 and n_pred == 0:
        return 1.0
    intersection = 0
    union = int(table.true_area.sum())
    used = np.zeros(n_pred, dtype=bool)
    if table.pair_true.size:
        iou = table.pair_iou
        # For each true object, its pair of highest IoU: sort by (true, -iou) and take each true's first pair.
        order = np.lexsort((-iou, table.pair_true))
        first = order[np.r_[True, np.diff(table.pair_true[order]) != 0]]
        best_pred = table.pair_pred[first]
        intersection = int(table.pair_intersection[first].sum())
        # union of a pair = true area + pred area - intersection; the true areas are already in `union`.
        union += int(table.pred_area[best_pred].sum()) - intersection
        used[best_pred] = True
    union += int(table.pred_area[~used].sum())
    return _ratio(intersection, union)


def matches(table: Overlaps, *, iou_threshold: float = MATCH_IOU) -> tuple[np.ndarray, np.ndarray]:
    """The matched pairs (indices into the pair arrays) and their IoUs: pairs with IoU strictly above the
    threshold. For a threshold of 0.5 or more each object takes part in at most one match."""
    if iou_threshold < 0.5:
        raise ValueError("matching by threshold alone is one-to-one only for thresholds of 0.5 or more")
    iou = table.pair_iou if table.pair_true.size else np.zeros(0)
    keep = np.flatnonzero(iou > iou_threshold)
    return keep, iou[keep]


def score_image(pred: np.ndarray, true: np.ndarray, *, name: str = "") -> ImageScores:
    """All scores of one predicted mask against its ground truth.

    Both may be binary masks or instance label maps (see :func:`to_instances`); pixel scores use non-zero
    as foreground.
    """
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"{name or 'image'}: prediction {pred.shape} and ground truth {true.shape} differ")
    dice, iou = dice_iou(pred, true)
    table = overlaps(to_instances(pred), to_instances(true))
    n_pred, n_true = table.pred_area.size, table.true_area.size
    _, matched_iou = matches(table)
    tp = int(matched_iou.size)
    fp, fn = n_pred - tp, n_true - tp
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    sq = float(matched_iou.mean()) if tp else (1.0 if n_pred == n_true == 0 else 0.0)
    inter = int(np.count_nonzero((pred != 0) & (true != 0)))
    return ImageScores(
        name=name,
        dice=dice,
        iou=iou,
        f1=f1,
        precision=_ratio(tp, n_pred) if n_pred or n_true == 0 else 0.0,
        recall=_ratio(tp, n_true) if n_true or n_pred == 0 else 0.0,
        aji=aji(table),
        pq=f1 * sq,
        sq=sq,
        n_true=n_true,
        n_pred=n_pred,
        tp=tp,
        fp=fp,
        fn=fn,
        intersection=inter,
        pred_pixels=int(np.count_nonzero(pred)),
        true_pixels=int(np.count_nonzero(true)),
    )


# Scores averaged over images in a summary (the paper's convention for Dice and IoU).
MEAN_SCORES = ("dice", "iou", "f1", "aji", "pq")


@dataclass(frozen=True)
class Summary:
    """Scores over a set of images: per-image means (with their std over images) and pooled scores."""

    n_images: int
    dice: float
    iou: float
    f1: float
    aji: float
    pq: float
    dice_std: float
    iou_std: float
    f1_std: float
    aji_std: float
    pq_std: float
    pooled_dice: float  # 2·ΣI / (ΣP + ΣT) over every pixel of every image
    pooled_iou: float
    pooled_f1: float  # from the summed TP, FP, FN of every image

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def summarize(rows: Iterable[ImageScores]) -> Summary:
    """Means over images of the per-image scores, and the pooled pixel and object scores."""
    rows = list(rows)
    if not rows:
        raise ValueError("no images to summarise")

    def column(name: str) -> np.ndarray:
        return np.array([getattr(r, name) for r in rows], dtype=float)

    means = {name: float(column(name).mean()) for name in MEAN_SCORES}
    stds = {f"{name}_std": float(column(name).std()) for name in MEAN_SCORES}
    inter = int(column("intersection").sum())
    sizes = int(column("pred_pixels").sum() + column("true_pixels").sum())
    tp, fp, fn = (int(column(k).sum()) for k in ("tp", "fp", "fn"))
    return Summary(
        n_images=len(rows),
        **means,
        **stds,
        pooled_dice=_ratio(2 * inter, sizes),
        pooled_iou=_ratio(inter, sizes - inter),
        pooled_f1=_ratio(2 * tp, 2 * tp + fp + fn),
    )


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of seeds' scores."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0
