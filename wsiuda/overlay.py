"""A thumbnail of the slide with nucleus outlines drawn on it, for a quick look at a run's result."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from wsiuda.config import atomic_output
from wsiuda.errors import OutputError

OUTLINE_COLOR = (0, 255, 0)


def draw_outlines(
    thumbnail: np.ndarray,
    rings: Iterable[np.ndarray],
    *,
    scale: float,
    color: Sequence[int] = OUTLINE_COLOR,
    thickness: int = 1,
) -> np.ndarray:
    """A copy of RGB ``thumbnail`` with rings ((n, 2) level-0 (x, y)) drawn at ``scale`` px per level-0 px.

    Rings are drawn one at a time, so any number of them can be streamed in.
    """
    out = np.ascontiguousarray(thumbnail.copy())
    rgb = tuple(int(c) for c in color)
    for ring in rings:
        points = np.rint(np.asarray(ring, dtype=np.float64) * scale).astype(np.int32)
        if len(points) == 0:
            continue
        if np.ptp(points[:, 0]) == 0 and np.ptp(points[:, 1]) == 0:
            # Smaller than a thumbnail pixel: a dot marks it.
            out[np.clip(points[0, 1], 0, out.shape[0] - 1), np.clip(points[0, 0], 0, out.shape[1] - 1)] = rgb
            continue
        cv2.polylines(out, [points.reshape(-1, 1, 2)], isClosed=True, color=rgb, thickness=thickness)
    return out


def write_png(path: Path | str, image: np.ndarray) -> None:
    """Save an RGB uint8 image as PNG, atomically (temp + rename)."""
    path = Path(path)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OutputError(f"cannot encode the overlay for {path}")
    try:
        with atomic_output(path) as tmp:
            tmp.write_bytes(encoded.tobytes())
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror}; choose a writable folder") from None
