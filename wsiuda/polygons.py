"""Labelled nuclei → valid shapely polygons with measurements, in level-0 pixels of the original slide.

A label image lives in a window of the working grid; ``origin`` places the window in the working frame and
``scale`` (working px per level-0 px, see :func:`wsiuda.geometry.scale_factor`) maps it back to level 0.
Outlines follow pixel edges (the contour through boundary-pixel centres grown by half a pixel), so a
polygon's area matches the nucleus's pixel count. Coordinates are snapped to a 0.01 px grid, as QuPath 0.6
does on import, and every polygon returned is valid on that grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry import Polygon, box

GRID = 0.01
"""Coordinate grid in level-0 px (QuPath 0.6 snaps to it; a polygon valid off-grid can be invalid on it)."""

SIMPLIFY_PX = 0.5
"""Douglas-Peucker tolerance of outlines, in working px."""

MEASUREMENTS = ("Area µm^2", "Perimeter µm", "Mean probability", "Circularity", "Solidity")


@dataclass(frozen=True)
class NucleusShape:
    """One nucleus in level-0 slide pixels."""

    polygon: Polygon
    centroid: tuple[float, float]
    """(y, x) in level-0 px, from the nucleus's pixels."""
    measurements: dict[str, float]


def nucleus_polygons(
    labels: np.ndarray,
    ids: np.ndarray,
    *,
    probability: np.ndarray,
    origin: tuple[int, int] = (0, 0),
    scale: float = 1.0,
    level0_mpp: float | None = None,
    level0_shape: tuple[int, int] | None = None,
) -> list[NucleusShape]:
    """Polygons and measurements of the nuclei ``ids`` of ``labels``, in the order of ``ids``.

    ``origin`` is the (y, x) of the labels' top-left pixel in the working frame; ``scale`` is working px
    per level-0 px; ``probability`` (same shape as labels) gives each nucleus's mean probability;
    ``level0_mpp`` converts areas and lengths to µm (without it they stay in level-0 px); outlines are cut
    at the slide's edge when ``level0_shape`` (height, width) is given. A nucleus whose outline
    degenerates on the coordinate grid is left out.
    """
    if probability.shape != labels.shape:
        raise ValueError(f"probability {probability.shape} does not match labels {labels.shape}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if probability.dtype not in (np.float32, np.float64):  # OpenCV's masked mean refuses some (bool)
        probability = probability.astype(np.float32)
    boxes = ndi.find_objects(labels)
    found: list[tuple[tuple[slice, slice], np.ndarray, np.ndarray]] = []
    for nucleus_id in np.asarray(ids, dtype=np.int64):
        box = boxes[nucleus_id - 1] if 0 < nucleus_id <= len(boxes) else None
        if box is None:
            continue
        inside = labels[box] == nucleus_id
        points = _centre_line(inside, top=box[0].start + origin[0], left=box[1].start + origin[1])
        if points is not None:
            found.append((box, inside, points))
    if not found:
        return []
    # GEOS runs over all outlines at once: one call per step, not one per nucleus.
    lines = _geometries([points for _, _, points in found])
    # Growing the line through boundary-pixel centres by half a pixel puts the outline on pixel edges.
    grown = shapely.buffer(
        lines,
        0.5,
        cap_style="square",
        join_style="mitre",
        mitre_limit=2.0,
    )
    outlines = valid_polygons(shapely.transform(grown, lambda xy: xy / scale))

    kept = []
    for (box, inside, _), polygon in zip(found, outlines, strict=True):
        if polygon is not None and level0_shape is not None:
            polygon = _inside_slide(polygon, level0_shape)
        if polygon is not None:
            kept.append((box, inside, polygon))
    if not kept:
        return []
    polygons = np.array([polygon for _, _, polygon in kept], dtype=object)
    unit = level0_mpp if level0_mpp is not None else 1.0
    areas = (shapely.area(polygons) * unit**2).tolist()
    perimeters = (shapely.length(polygons) * unit).tolist()
    hull_areas = (shapely.area(shapely.convex_hull(polygons)) * unit**2).tolist()

    shapes: list[NucleusShape] = []
    for (box, inside, polygon), area, perimeter, hull_area in zip(
        kept, areas, perimeters, hull_areas, strict=True
    ):
        top, left = box[0].start + origin[0], box[1].start + origin[1]
        # OpenCV's moments and masked mean: the same sums as numpy's, without numpy's per-call overhead,
        # which this loop pays for every nucleus.
        mask = inside.view(np.uint8)
        moments = cv2.moments(mask, binaryImage=True)
        row, column = moments["m01"] / moments["m00"], moments["m10"] / moments["m00"]
        centroid = ((row + top + 0.5) / scale, (column + left + 0.5) / scale)
        measurements = {
            MEASUREMENTS[0]: round(area, 4),
            MEASUREMENTS[1]: round(perimeter, 4),
            MEASUREMENTS[2]: round(cv2.mean(probability[box], mask=mask)[0], 4),
            MEASUREMENTS[3]: round(min(4 * math.pi * area / perimeter**2, 1.0), 4) if perimeter > 0 else 0.0,
            MEASUREMENTS[4]: round(min(area / hull_area, 1.0), 4) if hull_area > 0 else 0.0,
        }
        shapes.append(NucleusShape(polygon=polygon, centroid=centroid, measurements=measurements))
    return shapes


def _centre_line(inside: np.ndarray, *, top: int, left: int) -> np.ndarray | None:
    """The line through the boundary-pixel centres of one nucleus mask (its box cut out of the labels),
    simplified: its vertices (n, 2) as (x, y) in working px.

    ``top`` and ``left`` place the box in the working frame. Simplifying the pixel staircase keeps
    perimeters (and so circularity) near the true shape's and halves the vertex count; Douglas-Peucker
    at 0.5 px keeps area within about 2% on nuclei of 6-40 px radius. OpenCV simplifies the contour
    before it becomes a polygon: GEOS simplifies a polygon and then repairs it with a buffer, and with that
    this function took 26 ms instead of 19 on a dense tile (timed by hand). Here make_valid repairs the
    rare outline that simplification folds.
    """
    padded = cv2.copyMakeBorder(inside.view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    contours, _ = cv2.findContours(padded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    # A watershed nucleus is one piece; should a diagonal touch split it, keep the largest piece.
    contour = contours[0] if len(contours) == 1 else max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
    if len(contour) > 3:
        simplified = cv2.approxPolyDP(contour, SIMPLIFY_PX, True)
        if len(simplified) >= 3:  # a thin nucleus can simplify to a line: it keeps its contour
            contour = simplified
    # Contour points are (x, y) indices in the padded box: +0.5 moves to pixel centres, -1 undoes the pad.
    return contour[:, 0, :] + np.array([left - 0.5, top - 0.5])


def _geometries(lines: list[np.ndarray]) -> np.ndarray:
    """Centre lines as geometries, made valid: a Polygon from three vertices on, else a line or a point."""
    sizes = np.array([len(points) for points in lines])
    geometries = np.empty(len(lines), dtype=object)
    rings = sizes >= 3
    if rings.any():
        coordinates = np.concatenate([points for points, ring in zip(lines, rings, strict=True) if ring])
        index = np.repeat(np.arange(int(rings.sum())), sizes[rings])
        geometries[rings] = shapely.make_valid(
            shapely.polygons(shapely.linearrings(coordinates, indices=index))
        )
    for i in np.flatnonzero(~rings):
        points = lines[i]
        geometries[i] = shapely.LineString(points) if len(points) == 2 else shapely.Point(points[0])
    return geometries


def _inside_slide(polygon: Polygon, shape: tuple[int, int]) -> Polygon | None:
    """The polygon cut at the slide's edge: growing outlines onto pixel edges can step past it."""
    min_x, min_y, max_x, max_y = polygon.bounds
    if min_x >= 0 and min_y >= 0 and max_x <= shape[1] and max_y <= shape[0]:
        return polygon
    return valid_polygon(polygon.intersection(box(0, 0, shape[1], shape[0])))


def valid_polygon(geometry: shapely.Geometry) -> Polygon | None:
    """``geometry`` as one valid polygon on the 0.01 px grid, counter-clockwise; None if it degenerates.

    An invalid input is repaired (make_valid); a multi-part result keeps its largest polygon.
    """
    return valid_polygons(np.array([geometry], dtype=object))[0]


def valid_polygons(geometries: np.ndarray) -> list[Polygon | None]:
    """:func:`valid_polygon` of each of an array of geometries, with one GEOS call per step for all."""
    geometries = np.asarray(geometries, dtype=object)
    present = ~(shapely.is_missing(geometries) | shapely.is_empty(geometries))
    snapped = np.full(len(geometries), None, dtype=object)
    if present.any():
        snapped[present] = _on_grid(shapely.make_valid(geometries[present]))
    # Nearly every outline is one polygon by now: those are checked in one GEOS call per step; the
    # others (collections, lines, points) go part by part.
    single = (shapely.get_type_id(snapped) == shapely.GeometryType.POLYGON) & (shapely.area(snapped) > 0)
    for index in np.flatnonzero(~single & present):
        polygons = _polygon_parts(snapped[index])
        snapped[index] = max(polygons, key=lambda g: g.area) if polygons else None
    snapped = shapely.orient_polygons(snapped, exterior_cw=False)
    snapped[~shapely.is_valid(snapped)] = None
    return list(snapped)


def _on_grid(geometries: np.ndarray) -> np.ndarray:
    """Valid geometries snapped to :data:`GRID`, valid on it.

    Each vertex is rounded to the grid, and GEOS's slower valid-output snapping (an overlay) repairs those
    that rounding made invalid. On nuclei rounding keeps nearly every outline valid; it gave the same
    shapes as the valid-output snapping (which starts some rings at another vertex), in an eighth of the
    time (benchmarks/results/nuclei_steps.md).
    """
    snapped = shapely.set_precision(geometries, GRID, mode="pointwise")
    broken = ~shapely.is_valid(snapped)
    if broken.any():
        snapped[broken] = shapely.set_precision(geometries[broken], GRID)
    return snapped


def _polygon_parts(geometry: shapely.Geometry) -> list[Polygon]:
    return [g for g in _parts(geometry) if isinstance(g, Polygon) and not g.is_empty and g.area > 0]


def _parts(geometry: shapely.Geometry) -> list[shapely.Geometry]:
    if hasattr(geometry, "geoms"):
        return [part for sub in geometry.geoms for part in _parts(sub)]
    return [geometry]
