"""Metrics against values computed by hand on tiny arrays, edge cases, and a brute-force cross-check."""

from __future__ import annotations

import numpy as np
import pytest

from wsiuda.metrics import (
    aji,
    dice_iou,
    matches,
    mean_std,
    overlaps,
    score_image,
    summarize,
    to_instances,
)


def canvas(height: int = 6, width: int = 8) -> np.ndarray:
    return np.zeros((height, width), dtype=np.uint8)


def test_identical_masks_score_one_everywhere() -> None:
    true = canvas()
    true[1:4, 1:4] = 255
    true[4:6, 6:8] = 255
    s = score_image(true.copy(), true)
    assert (s.dice, s.iou, s.f1, s.aji, s.pq, s.sq) == (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    assert (s.n_true, s.n_pred, s.tp, s.fp, s.fn) == (2, 2, 2, 0, 0)
    assert (s.intersection, s.pred_pixels, s.true_pixels) == (13, 13, 13)


def test_partial_overlap_pixel_scores() -> None:
    pred, true = canvas(), canvas()
    pred[0:2, 0:2] = 1  # 4 px
    true[0:2, 0:3] = 1  # 6 px, 4 shared
    dice, iou = dice_iou(pred, true)
    assert dice == pytest.approx(2 * 4 / (4 + 6))
    assert iou == pytest.approx(4 / 6)
    s = score_image(pred, true)
    # The single pair has IoU 4/6 > 0.5: matched.
    assert (s.tp, s.fp, s.fn) == (1, 0, 0)
    assert s.f1 == 1.0
    assert s.sq == pytest.approx(4 / 6)
    assert s.pq == pytest.approx(4 / 6)
    assert s.aji == pytest.approx(4 / 6)


def test_empty_prediction_against_nuclei_scores_zero() -> None:
    true = canvas()
    true[1:3, 1:3] = 255
    s = score_image(canvas(), true)
    assert (s.dice, s.iou, s.f1, s.aji, s.pq, s.precision, s.recall) == (0, 0, 0, 0, 0, 0, 0)
    assert (s.n_pred, s.n_true, s.tp, s.fp, s.fn) == (0, 1, 0, 0, 1)


def test_prediction_on_empty_ground_truth_scores_zero() -> None:
    pred = canvas()
    pred[1:3, 1:3] = 255
    s = score_image(pred, canvas())
    assert (s.dice, s.iou, s.f1, s.aji, s.pq, s.precision, s.recall) == (0, 0, 0, 0, 0, 0, 0)
    assert (s.n_pred, s.n_true, s.tp, s.fp, s.fn) == (1, 0, 0, 1, 0)


def test_both_empty_agree_perfectly() -> None:
    s = score_image(canvas(), canvas())
    assert (s.dice, s.iou, s.f1, s.aji, s.pq, s.precision, s.recall) == (1, 1, 1, 1, 1, 1, 1)


def test_one_nucleus_split_in_two() -> None:
    true = canvas()
    true[0:2, 0:5] = 255  # one nucleus, 10 px
    pred = np.zeros_like(true, dtype=np.uint16)
    pred[0:2, 0:3] = 1  # 6 px: IoU 0.6 with the nucleus
    pred[0:2, 3:5] = 2  # 4 px: IoU 0.4, touching the first: only an instance map keeps them apart
    s = score_image(pred, true)
    assert (s.dice, s.iou) == (1.0, 1.0)  # pixels are all right
    assert (s.n_pred, s.n_true, s.tp, s.fp, s.fn) == (2, 1, 1, 1, 0)
    assert s.f1 == pytest.approx(2 / 3)
    assert s.sq == pytest.approx(0.6)
    assert s.pq == pytest.approx(0.4)
    # AJI: the nucleus pairs with part 1 (I 6, U 10); part 2 is unpaired and adds its 4 px to the union.
    assert s.aji == pytest.approx(6 / 14)


def test_two_nuclei_merged_into_one() -> None:
    true = np.zeros((6, 8), dtype=np.uint16)
    true[0:2, 0:2] = 1  # 4 px
    true[0:2, 2:5] = 2  # 6 px, touching nucleus 1
    pred = canvas()
    pred[0:2, 0:5] = 255  # one blob of 10 px
    s = score_image(pred, true)
    assert (s.dice, s.iou) == (1.0, 1.0)
    assert (s.n_pred, s.n_true, s.tp, s.fp, s.fn) == (1, 2, 1, 0, 1)
    assert s.f1 == pytest.approx(2 / 3)
    assert s.pq == pytest.approx(2 / 3 * 0.6)
    # AJI: both nuclei pair with the blob: C = 4 + 6, U = 10 + 10.
    assert s.aji == pytest.approx(0.5)


def test_iou_of_exactly_one_half_is_not_a_match() -> None:
    true = canvas()
    true[0:2, 0:4] = 1  # 8 px
    pred = canvas()
    pred[0:2, 0:2] = 1  # 4 px inside: IoU exactly 0.5
    s = score_image(pred, true)
    assert (s.tp, s.fp, s.fn) == (0, 1, 1)
    assert s.f1 == 0.0
    assert s.aji == pytest.approx(0.5)


def test_binary_masks_become_eight_connected_components() -> None:
    mask = canvas()
    mask[0, 0] = mask[1, 1] = 255  # diagonal neighbours: one nucleus
    mask[4, 4] = 255
    labels = to_instances(mask)
    assert labels.dtype == np.int32
    assert labels.max() == 2
    assert labels[0, 0] == labels[1, 1] != labels[4, 4]
    assert to_instances(mask.astype(bool)).max() == 2


def test_instance_label_maps_are_kept_and_relabelled() -> None:
    labels = np.zeros((4, 4), dtype=np.uint16)
    labels[0, 0:2] = 700
    labels[0, 2:4] = 3  # touching 700: kept apart
    labels[3, 3] = 700  # same id, not connected: still one object
    out = to_instances(labels)
    assert sorted(np.unique(out).tolist()) == [0, 1, 2]
    assert out[0, 2] == 1 and out[0, 0] == 2 and out[3, 3] == 2


def test_summary_means_and_pooled_scores_differ_as_defined() -> None:
    true_a = canvas()
    true_a[0:2, 0:2] = 1
    true_b = canvas()
    true_b[0:3, 0:4] = 1  # 12 px, missed entirely
    rows = [score_image(true_a, true_a, name="a"), score_image(canvas(), true_b, name="b")]
    summary = summarize(rows)
    assert summary.n_images == 2
    assert summary.dice == pytest.approx(0.5)
    assert summary.dice_std == pytest.approx(0.5)
    assert summary.pooled_dice == pytest.approx(2 * 4 / (4 + 4 + 12))
    assert summary.pooled_iou == pytest.approx(4 / 16)
    assert summary.pooled_f1 == pytest.approx(2 / 3)
    assert summary.from_dict(summary.as_dict()) == summary
    with pytest.raises(ValueError):
        summarize([])


def test_mean_std_uses_sample_std() -> None:
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, np.sqrt(2.0)))
    assert mean_std([0.7]) == (0.7, 0.0)


def test_mismatched_shapes_and_low_thresholds_are_refused() -> None:
    with pytest.raises(ValueError, match="differ"):
        score_image(canvas(6, 8), canvas(8, 6))
    with pytest.raises(ValueError):
        matches(overlaps(canvas(), canvas()), iou_threshold=0.3)


def _brute_force(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """AJI and F1 straight from the definitions, object by object."""
    pred_ids = [i for i in np.unique(pred) if i]
    true_ids = [i for i in np.unique(true) if i]
    inter_sum, union_sum, used, tp = 0, 0, set(), 0
    for t in true_ids:
        tm = true == t
        best, best_iou = None, 0.0
        for p in pred_ids:
            pm = pred == p
            iou = (tm & pm).sum() / (tm | pm).sum()
            tp += iou > 0.5
            if iou > best_iou:
                best, best_iou = p, iou
        if best is None:
            union_sum += tm.sum()
        else:
            pm = pred == best
            inter_sum += (tm & pm).sum()
            union_sum += (tm | pm).sum()
            used.add(best)
    union_sum += sum(int((pred == p).sum()) for p in pred_ids if p not in used)
    f1 = 2 * tp / (len(pred_ids) + len(true_ids)) if pred_ids or true_ids else 1.0
    return inter_sum / union_sum if union_sum else 1.0, f1


@pytest.mark.parametrize("seed", range(5))
def test_fast_instance_scores_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)

    def blobs() -> np.ndarray:
        labels = np.zeros((24, 24), dtype=np.int32)
        for k in range(1, 7):
            y, x = rng.integers(0, 20, size=2)
            h, w = rng.integers(2, 6, size=2)
            labels[y : y + h, x : x + w] = k
        return labels

    pred, true = blobs(), blobs()
    s = score_image(pred, true)
    expected_aji, expected_f1 = _brute_force(to_instances(pred), to_instances(true))
    assert s.aji == pytest.approx(expected_aji)
    assert s.f1 == pytest.approx(expected_f1)
    assert aji(overlaps(to_instances(pred), to_instances(true))) == pytest.approx(expected_aji)
