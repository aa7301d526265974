"""A thumbnail of the slide with nucleus outlines drawn on it, for a quick look at a run's result."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
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

    Rings are drawn a chunk at a time, so any number of them can be streamed in.
    """
    chunks = (
        (np.concatenate(chunk), np.array([len(ring) for ring in chunk])) for chunk in _chunks(rings, _CHUNK)
    )
    return draw_outline_batches(thumbnail, chunks, scale=scale, color=color, thickness=thickness)


def draw_outline_batches(
    thumbnail: np.ndarray,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    scale: float,
    color: Sequence[int] = OUTLINE_COLOR,
    thickness: int = 1,
) -> np.ndarray:
    """:func:`draw_outlines` of rings given a batch at a time: each batch holds all its rings' points
    ((n, 2) level-0 (x, y)), ring after ring, and each ring's point count (as
    :func:`wsiuda.io.geojson.exterior_rings` gives them), drawn with one OpenCV call."""
    out = np.ascontiguousarray(thumbnail.copy())
    rgb = tuple(int(c) for c in color)
    for points, counts in batches:
        _draw_batch(out, points, counts, scale=scale, color=rgb, thickness=thickness)
    return out


# Rings drawn per call: one OpenCV call and one rounding for many rings, at a bounded memory.
_CHUNK = 4096


def _chunks(rings: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    chunk: list[np.ndarray] = []
    for ring in rings:
        ring = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
        if len(ring):
            chunk.append(ring)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _draw_batch(
    out: np.ndarray,
    points: np.ndarray,
    counts: np.ndarray,
    *,
    scale: float,
    color: tuple[int, ...],
    thickness: int,
) -> None:
    counts = np.asarray(counts, dtype=np.int64)
    if not counts.any():
        return
    # Empty rings are left out: reduceat needs every start inside the points.
    starts = (np.cumsum(counts) - counts)[counts > 0]
    points = np.rint(np.asarray(points, dtype=np.float64).reshape(-1, 2) * scale).astype(np.int32)
    # A ring smaller than a thumbnail pixel is a dot.
    dots = (np.maximum.reduceat(points, starts) == np.minimum.reduceat(points, starts)).all(axis=1)
    # Slices, not np.split: its per-piece overhead was half of this function's time (timed by hand).
    ends = starts + counts[counts > 0]
    lines = [
        points[start:end].reshape(-1, 1, 2)
        for start, end, dot in zip(starts.tolist(), ends.tolist(), dots.tolist(), strict=True)
        if not dot
    ]
    if lines:
        cv2.polylines(out, lines, isClosed=True, color=color, thickness=thickness)
    first = points[starts[dots]]
    out[np.clip(first[:, 1], 0, out.shape[0] - 1), np.clip(first[:, 0], 0, out.shape[1] - 1)] = color


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
