"""Class-balanced pseudo-labels for self-training (CBST, Zou et al. 2018), on numpy probability maps."""

from __future__ import annotations

import numpy as np

IGNORE = -1


def class_balanced_pseudo_labels(probabilities: np.ndarray, *, portion: float) -> np.ndarray:
    """int8 labels: 1 / 0 for the most confident ``portion`` of the pixels predicted foreground / background,
    -1 (ignored) elsewhere.

    Each class gets its own confidence threshold (the (1 - portion) quantile of its pixels' confidence), so
    the rarer class (nuclei) keeps as large a share of its pixels as the background does.
    """
    p = np.asarray(probabilities, dtype=np.float32)
    labels = np.full(p.shape, IGNORE, dtype=np.int8)
    foreground = p >= 0.5
    for value, members, confidence in ((1, foreground, p), (0, ~foreground, 1.0 - p)):
        if not members.any():
            continue
        threshold = np.quantile(confidence[members], 1.0 - portion)
        labels[members & (confidence >= threshold)] = value
    return labels


def portion_for_round(round_index: int, *, start: float, step: float, maximum: float) -> float:
    """The share of each class kept in a self-training round: start, start + step, ... up to maximum."""
    return min(maximum, start + step * round_index)
