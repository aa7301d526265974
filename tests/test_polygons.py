"""Labelled nuclei → valid level-0 polygons and measurements."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import Point, Polygon

from wsiuda.polygons import GRID, MEASUREMENTS, nucleus_polygons, valid_polygon


def disk_labels(shape: tuple[int, int], circles: list[tuple[int, int, int]]) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    for label, (cy, cx, r) in enumerate(circles, start=1):
        cv2.circle(labels, (cx, cy), r, label, thickness=-1)
    return labels


def test_disk_outline_matches_the_pixels_it_covers() -> None:
    labels = disk_labels((80, 80), [(40, 38, 15)])
    (shape,) = nucleus_polygons(labels, np.array([1]), probability=np.full(labels.shape, 0.8, np.float32))
    polygon = shape.polygon
    assert polygon.is_valid and isinstance(polygon, Polygon)
    pixels = int((labels == 1).sum())
    assert abs(polygon.area - pixels) / pixels < 0.02
    # Pixel (row 40, column 38) covers [38, 39) x [40, 41): its centre is (38.5, 40.5).
    truth = Point(38.5, 40.5).buffer(15.5)
    assert polygon.intersection(truth).area / polygon.union(truth).area > 0.95
    np.testing.assert_allclose(shape.centroid, (40.5, 38.5), atol=0.05)
    assert set(shape.measurements) == set(MEASUREMENTS)
    assert shape.measurements["Mean probability"] == pytest.approx(0.8)
    assert 0.88 < shape.measurements["Circularity"] <= 1.0
    assert 0.95 < shape.measurements["Solidity"] <= 1.0


def test_working_grid_maps_back_to_level_zero() -> None:
    """A window at working origin (100, 60) on a grid 2x finer than level 0 (a 20x slide worked at 40x)."""
    labels = disk_labels((80, 80), [(40, 40, 20)])
    probability = np.ones(labels.shape, np.float32)
    (shape,) = nucleus_polygons(labels, np.array([1]), probability=probability, origin=(100, 60), scale=2.0)
    # Working pixel centre (140.5, 100.5) is level-0 (70.25, 50.25); the radius halves.
    np.testing.assert_allclose(shape.centroid, (70.25, 50.25), atol=0.05)
    bounds = shape.polygon.bounds  # minx, miny, maxx, maxy
    np.testing.assert_allclose(bounds, (50.25 - 10.25, 70.25 - 10.25, 50.25 + 10.25, 70.25 + 10.25), atol=0.3)
    (with_mpp,) = nucleus_polygons(
        labels, np.array([1]), probability=probability, origin=(100, 60), scale=2.0, level0_mpp=0.5
    )
    assert with_mpp.measurements["Area µm^2"] == pytest.approx(shape.polygon.area * 0.25, rel=1e-3)
    # Each working pixel is a quarter of a level-0 pixel of 0.5 x 0.5 µm.
    assert with_mpp.measurements["Area µm^2"] == pytest.approx((labels == 1).sum() / 4 * 0.25, rel=0.03)


def test_awkward_shapes_give_valid_polygons() -> None:
    labels = np.zeros((40, 40), np.int32)
    labels[5, 5] = 1  # one pixel
    labels[10, 10:13] = 2  # a line
    labels[20, 20] = labels[21, 21] = labels[22, 22] = 3  # a diagonal (8-connected only)
    labels[30:35, 30:35] = 4
    labels[32, 32] = 0  # a hole
    labels[25, 5] = labels[26, 6] = labels[25, 7] = labels[26, 8] = 5  # a zigzag
    ids = np.arange(1, 6)
    shapes = nucleus_polygons(labels, ids, probability=np.ones(labels.shape, np.float32))
    assert len(shapes) == 5
    for shape in shapes:
        assert shape.polygon.is_valid and shape.polygon.area > 0
        coords = np.asarray(shape.polygon.exterior.coords)
        np.testing.assert_allclose(coords, np.round(coords / GRID) * GRID, atol=1e-9)
    assert shapes[0].polygon.area == pytest.approx(1.0)


def test_ids_not_present_are_skipped_and_order_is_kept() -> None:
    labels = disk_labels((60, 100), [(30, 20, 10), (30, 70, 12)])
    shapes = nucleus_polygons(labels, np.array([2, 7, 1]), probability=np.ones(labels.shape, np.float32))
    assert [round(s.centroid[1]) for s in shapes] == [70, 20]


def test_valid_polygon_repairs_or_refuses() -> None:
    bowtie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    assert not bowtie.is_valid
    repaired = valid_polygon(bowtie)
    assert repaired is not None and repaired.is_valid and isinstance(repaired, Polygon)
    assert valid_polygon(Polygon([(0, 0), (0.001, 0), (0.001, 0.001)])) is None
    assert valid_polygon(shapely.Polygon()) is None


def test_a_polygon_that_rounding_to_the_grid_would_break_comes_out_valid() -> None:
    # A slit narrower than the grid: rounding each vertex folds its two edges onto one line.
    slit = Polygon([(0, 0), (10, 0), (10, 1.002), (1, 1.002), (1, 1.004), (10, 1.004), (10, 2), (0, 2)])
    assert slit.is_valid
    assert not shapely.set_precision(slit, GRID, mode="pointwise").is_valid
    snapped = valid_polygon(slit)
    assert snapped is not None and snapped.is_valid
    assert snapped.area == pytest.approx(slit.area, abs=0.1)
    on_grid = shapely.get_coordinates(snapped) / GRID
    np.testing.assert_allclose(on_grid, np.round(on_grid), atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_centroid_and_mean_probability_are_those_of_the_nucleus_pixels(dtype: type) -> None:
    labels = disk_labels((60, 70), [(20, 25, 9), (38, 47, 12)])
    labels[36:40, 30:34] = 2  # a bump: the centroid is no longer the disk's centre
    probability = np.random.default_rng(3).random(labels.shape).astype(dtype)
    shapes = nucleus_polygons(labels, np.array([2, 1]), probability=probability, origin=(100, 200), scale=0.5)
    for nucleus_id, shape in zip((2, 1), shapes, strict=True):
        ys, xs = np.nonzero(labels == nucleus_id)
        np.testing.assert_allclose(shape.centroid, ((ys.mean() + 100.5) / 0.5, (xs.mean() + 200.5) / 0.5))
        expected = probability[labels == nucleus_id].astype(np.float64).mean()
        assert shape.measurements["Mean probability"] == pytest.approx(round(expected, 4), abs=1e-4)
