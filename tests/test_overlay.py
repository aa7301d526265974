"""The overlay thumbnail: nucleus outlines drawn on the slide."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from wsiuda import overlay


def one_by_one(thumbnail: np.ndarray, rings: list[np.ndarray], scale: float) -> np.ndarray:
    """Each ring drawn on its own: a polyline, or a dot where it is smaller than a pixel."""
    out = thumbnail.copy()
    for ring in rings:
        points = np.rint(np.asarray(ring, dtype=np.float64).reshape(-1, 2) * scale).astype(np.int32)
        if not len(points):
            continue
        if (points == points[0]).all():
            out[np.clip(points[0, 1], 0, out.shape[0] - 1), np.clip(points[0, 0], 0, out.shape[1] - 1)] = (
                overlay.OUTLINE_COLOR
            )
        else:
            cv2.polylines(out, [points.reshape(-1, 1, 2)], True, overlay.OUTLINE_COLOR, 1)
    return out


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_outlines_drawn_in_chunks_equal_outlines_drawn_one_by_one(monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(overlay, "_CHUNK", chunk)
    rng = np.random.default_rng(0)
    rings = []
    for _ in range(20):
        centre, radius = rng.uniform(0, 400, 2), rng.uniform(2, 30)
        angles = np.linspace(0, 2 * np.pi, int(rng.integers(4, 40)))
        rings.append(np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], 1))
    rings.insert(5, np.array([[100.0, 100.0], [100.4, 100.2], [100.1, 100.4]]))  # under a pixel: a dot
    rings.insert(9, np.zeros((0, 2)))  # nothing to draw
    rings.append(np.array([[-50.0, -50.0], [-50.2, -50.1], [-50.1, -50.3]]))  # a dot off the edge, clipped
    thumbnail = np.full((128, 160, 3), 255, np.uint8)
    drawn = overlay.draw_outlines(thumbnail, iter(rings), scale=0.3)
    np.testing.assert_array_equal(drawn, one_by_one(thumbnail, rings, 0.3))
    assert (drawn != 255).any()
    assert (thumbnail == 255).all(), "the thumbnail itself is left as it was"
    # The same rings in two batches of points and counts, as the segment pipeline reads them per tile.
    batches = [
        (np.concatenate(part), np.array([len(ring) for ring in part])) for part in (rings[:7], rings[7:])
    ]
    batched = overlay.draw_outline_batches(thumbnail, iter(batches), scale=0.3)
    np.testing.assert_array_equal(batched, drawn)
