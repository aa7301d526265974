"""Foreground probability → labelled nuclei, with touching nuclei split, and which block owns which nucleus.

Touching nuclei are split by a marker-controlled watershed on the distance transform: each nucleus is a
dome of distance values, and domes whose peak stands at least ``split_depth_px`` above the saddle to
their neighbour become separate markers (h-maxima). Everything here is a pure function of the arrays it
is given, so a nucleus seen whole by two overlapping windows gets the same outline in both.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

try:
    from skimage.segmentation._watershed_cy import watershed_raveled as _watershed_raveled
except ImportError:  # pragma: no cover - a scikit-image that moved its compiled flood
    _watershed_raveled = None

from wsiuda.blocks import is_responsible
from wsiuda.geometry import Region

# The distance transform is quantised to this many levels per pixel so that the h-maxima reconstruction
# runs on uint8 with OpenCV (20x faster than on floats, timed by hand); distances saturate at 255 / levels px.
_LEVELS_PER_PX = 2
_KERNEL = np.ones((3, 3), np.uint8)


def label_nuclei(
    probability: np.ndarray,
    *,
    threshold: float = 0.5,
    min_area_px: int = 0,
    split_depth_px: float = 2.0,
) -> np.ndarray:
    """Label the nuclei of a probability map: int32 (H, W), 0 background, 1..n nuclei.

    Foreground is ``probability > threshold`` with holes filled; nuclei smaller than ``min_area_px`` are
    dropped; ``split_depth_px`` is how much narrower (in px of half-width) the neck between two touching
    nuclei must be than the thinner of them for the two to be split (0 disables splitting).
    """
    if probability.ndim != 2:
        raise ValueError(f"probability must be 2-D, got shape {probability.shape}")
    foreground = fill_holes(probability > threshold)
    labels = np.zeros(probability.shape, np.int32)
    if not foreground.any():
        return labels
    # Work inside the foreground's bounding box: the rest of a tile is often background.
    rows = np.flatnonzero(foreground.any(axis=1))
    cols = np.flatnonzero(foreground.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    labels[box] = _drop_small(_split(foreground[box], split_depth_px=split_depth_px), min_area_px)
    return labels


def block_mean(probability: np.ndarray, factor: int) -> np.ndarray:
    """The probability on a grid ``factor`` times coarser: the mean of each ``factor`` x ``factor`` block
    (float32). The sides must be multiples of ``factor``."""
    probability = np.asarray(probability, dtype=np.float32)
    if factor == 1:
        return probability
    height, width = probability.shape
    if height % factor or width % factor:
        raise ValueError(f"shape {probability.shape} is not a multiple of {factor}")
    # OpenCV's area resampling by a whole factor is the block mean, several times faster than numpy's.
    return np.asarray(
        cv2.resize(probability, (width // factor, height // factor), interpolation=cv2.INTER_AREA)
    )


def from_grid(points: np.ndarray, factor: int) -> np.ndarray:
    """(y, x) pixel positions on a grid ``factor`` times coarser → positions on the finer grid (the centre
    of coarse pixel i is at fine position (i + 0.5) * factor - 0.5)."""
    return (np.asarray(points, dtype=np.float64) + 0.5) * factor - 0.5


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` with its default structure, ten times faster (timed by hand).

    A hole is a background region, 4-connected as scipy's default has it, that does not reach the array's
    edge. scipy finds them by dilating from the edge one pixel per pass; here one flood fill from a
    one-pixel frame of background marks everything that reaches the edge, and the rest is filled.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return mask.copy()
    framed = cv2.copyMakeBorder(mask.view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.floodFill(framed, None, (0, 0), 2, flags=4)
    return framed[1:-1, 1:-1] != 2


def _split(foreground: np.ndarray, *, split_depth_px: float) -> np.ndarray:
    if split_depth_px <= 0:
        _, components = cv2.connectedComponents(foreground.astype(np.uint8), connectivity=8)
        return components.astype(np.int32)
    distance, markers = _markers(foreground, split_depth_px=split_depth_px)
    labels = _flood(-distance, markers, foreground)
    # Specks thinner than the split depth hold no marker: they become nuclei of their own.
    unmarked = foreground & (labels == 0)
    if unmarked.any():
        _, rest = cv2.connectedComponents(unmarked.astype(np.uint8), connectivity=8)
        labels[unmarked] = rest[unmarked] + labels.max()
    return labels


def _markers(foreground: np.ndarray, *, split_depth_px: float) -> tuple[np.ndarray, np.ndarray]:
    """(distance to the background, float32; watershed markers, int32): a marker per dome of distance
    that stands ``split_depth_px`` above its saddles (h-maxima)."""
    # Pad by one background pixel so that a nucleus cut by the box edge is still measured from its edge.
    padded = cv2.copyMakeBorder(foreground.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    # OpenCV's 5x5 chamfer distance, a close approximation of the Euclidean one: with it the distance and
    # the markers take under half the time they took with the exact transform, the same on any thread count
    # (the exact one rounds differently with OpenCV's threads, enough to tip watershed ties), and nuclei
    # split as well on the labelled test images (AJI, benchmarks/results/nuclei_steps.md).
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_5)[1:-1, 1:-1]
    # convertScaleAbs rounds to nearest and saturates at 255, as np.clip(np.rint(...)) would.
    levels = cv2.convertScaleAbs(distance, alpha=_LEVELS_PER_PX)
    depth = max(round(split_depth_px * _LEVELS_PER_PX), 1)
    domes = cv2.subtract(levels, _reconstruct(cv2.subtract(levels, np.full_like(levels, depth)), levels))
    _, markers = cv2.connectedComponents((domes >= depth).astype(np.uint8), connectivity=8)
    return distance, markers


def _flood(surface: np.ndarray, markers: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """The watershed of ``markers`` over ``surface`` within ``foreground``, piece by piece (int32).

    The watershed floods 4-connected pieces of the foreground independently: a piece holding one marker
    is all that marker's, and only pieces holding several are flooded, each in its own box: two fifths
    of the time of one flood over a dense tile (benchmarks/results/nuclei_steps.md). A piece's split then
    also depends on the piece alone: flooded together, pieces change each other's order of equal heights,
    and with it a few pixels where two nuclei meet.
    """
    # Without OpenCV's statistics, which cost several times the labelling itself: only the few pieces to
    # flood need a box.
    count, pieces = cv2.connectedComponents(foreground.astype(np.uint8), connectivity=4)
    marked = markers > 0
    stride = int(markers.max()) + 1
    pairs = np.unique(pieces[marked].astype(np.int64) * stride + markers[marked])  # (piece, marker) pairs
    piece_of_pair, marker_of_pair = pairs // stride, pairs % stride
    markers_per_piece = np.bincount(piece_of_pair, minlength=count)
    single = markers_per_piece[piece_of_pair] == 1
    marker_of_piece = np.zeros(count, np.int32)
    marker_of_piece[piece_of_pair[single]] = marker_of_pair[single]
    labels = marker_of_piece[pieces]  # background (piece 0) holds no marker: it stays 0
    to_flood = np.flatnonzero(markers_per_piece >= 2)
    if not len(to_flood):
        return labels
    boxes = ndi.find_objects(pieces, max_label=int(to_flood[-1]))
    for piece in to_flood:
        box = boxes[piece - 1]
        # The flood needs a ring of masked-out pixels round what it may fill: the box grown by one.
        inside = _with_ring(pieces, box) == piece
        flooded = _watershed_in(
            _with_ring(surface, box), np.where(inside, _with_ring(markers, box), 0), inside
        )
        inside, flooded = inside[1:-1, 1:-1], flooded[1:-1, 1:-1]
        labels[box][inside] = flooded[inside]
    return labels


def _with_ring(array: np.ndarray, box: tuple[slice, slice]) -> np.ndarray:
    """``array[box]`` grown by one pixel on every side, zeros where that steps past the array's edge."""
    (rows, cols), (height, width) = box, array.shape
    top, bottom, left, right = rows.start - 1, rows.stop + 1, cols.start - 1, cols.stop + 1
    inner = array[max(top, 0) : min(bottom, height), max(left, 0) : min(right, width)]
    if top >= 0 and left >= 0 and bottom <= height and right <= width:
        return inner
    return np.pad(inner, ((int(top < 0), int(bottom > height)), (int(left < 0), int(right > width))))


def _watershed_in(surface: np.ndarray, markers: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """``skimage.segmentation.watershed(surface, markers, mask=inside)`` (4-connected) for an ``inside``
    whose edge pixels are all False; returns the flooded markers (int32).

    Calls scikit-image's compiled flood directly: its public wrapper pads and checks the arrays first,
    which costs several times the flood of a nucleus-sized piece, once per piece. The arrays given are
    already what the wrapper would make of them (float64 surface, int32 markers, a mask with a clear
    edge), so the result is the same (tests/test_instances.py compares the two). Without the compiled
    function (a scikit-image that moved it), the public wrapper runs.
    """
    if _watershed_raveled is None:
        return np.asarray(watershed(surface, markers, mask=inside), dtype=np.int32)
    output = np.ascontiguousarray(markers, dtype=np.int32)
    width = surface.shape[1]
    _watershed_raveled(
        np.ascontiguousarray(surface, dtype=np.float64).ravel(),
        np.flatnonzero(output),
        np.array([-width, -1, 1, width], dtype=np.intp),  # the 4-neighbours, in scikit-image's order
        inside.view(np.int8).ravel(),
        np.array([width, 1], dtype=np.intp),
        0.0,
        output.ravel(),
        False,
    )
    return output


def _reconstruct(marker: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grey-scale reconstruction by dilation of ``marker`` under ``mask`` (uint8, geodesic 3x3 steps)."""
    current = marker
    while True:
        previous = current
        for _ in range(8):  # check convergence every few steps: the check costs as much as a step
            current = cv2.min(cv2.dilate(current, _KERNEL), mask)
        if cv2.norm(previous, current, cv2.NORM_INF) == 0:
            return current


def _drop_small(labels: np.ndarray, min_area_px: int) -> np.ndarray:
    """Remove nuclei under ``min_area_px`` and renumber the rest 1..n, keeping their order."""
    areas = np.bincount(labels.ravel())
    keep = areas >= max(min_area_px, 1)
    keep[0] = False
    lookup = np.zeros(len(areas), np.int32)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lookup[labels]


def centroids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids 1..n of the labelled nuclei and their centroids, float64 (n, 2) as (y, x) pixel indices."""
    count = int(labels.max())
    if count == 0:
        return np.zeros(0, np.int64), np.zeros((0, 2))
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    area = np.bincount(ids, minlength=count + 1)[1:]
    sum_y = np.bincount(ids, weights=ys, minlength=count + 1)[1:]
    sum_x = np.bincount(ids, weights=xs, minlength=count + 1)[1:]
    present = area > 0
    ids_present = np.arange(1, count + 1)[present]
    return ids_present, np.stack([sum_y[present], sum_x[present]], axis=1) / area[present, None]


def touching_edge(labels: np.ndarray) -> np.ndarray:
    """Ids of nuclei that touch the array's edge: their extent may continue outside it."""
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return np.unique(edge[edge > 0])


def owned_nuclei(
    labels: np.ndarray,
    core: Region,
    *,
    ids: np.ndarray | None = None,
    points: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The nuclei this block owns: centroid in ``core`` (given in the labels' frame), not cut by the edge.

    Returns their ids and centroids (y, x) in the labels' frame; pass ``ids`` and ``points`` from
    :func:`centroids` to reuse them. A nucleus cut by the window's edge is left out: with a halo of at least
    the largest nucleus, the block that owns it sees it whole.
    """
    if ids is None or points is None:
        ids, points = centroids(labels)
    cut = set(touching_edge(labels).tolist())
    keep = np.array(
        [int(i) not in cut and is_responsible(core, y, x) for i, (y, x) in zip(ids, points, strict=True)],
        dtype=bool,
    ).reshape(-1)
    return ids[keep], points[keep]
