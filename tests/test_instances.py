"""Probability → labelled nuclei: splitting touching nuclei, small objects, ownership."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi

from wsiuda.geometry import Region
from wsiuda.instances import (
    block_mean,
    centroids,
    fill_holes,
    from_grid,
    label_nuclei,
    owned_nuclei,
    touching_edge,
)


def disks(shape: tuple[int, int], circles: list[tuple[int, int, int]]) -> np.ndarray:
    probability = np.zeros(shape, np.float32)
    for cy, cx, r in circles:
        cv2.circle(probability, (cx, cy), r, 1.0, thickness=-1)
    return probability


def test_touching_nuclei_are_split_and_separate_ones_kept() -> None:
    # Two disks overlapping by a third of their diameter, and one on its own.
    probability = disks((120, 160), [(50, 40, 18), (50, 70, 18), (60, 130, 15)])
    labels = label_nuclei(probability, split_depth_px=2.0)
    assert labels.dtype == np.int32
    assert labels.max() == 3
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2, 3]
    # The pair splits near its neck (x = 55), each part about half the pair.
    left, right = labels[50, 30], labels[50, 80]
    assert left != right and left > 0 and right > 0
    assert abs(int((labels == left).sum()) - int((labels == right).sum())) < 80


def test_no_split_without_split_depth_and_no_split_of_a_round_nucleus() -> None:
    probability = disks((120, 160), [(50, 40, 18), (50, 70, 18)])
    assert label_nuclei(probability, split_depth_px=0).max() == 1
    assert label_nuclei(disks((80, 80), [(40, 40, 25)]), split_depth_px=2.0).max() == 1


def test_small_objects_are_dropped_and_holes_filled() -> None:
    probability = disks((100, 100), [(30, 30, 15), (80, 80, 2)])
    cv2.circle(probability, (30, 30), 4, 0.0, thickness=-1)  # a hole
    labels = label_nuclei(probability, min_area_px=50)
    assert labels.max() == 1
    assert labels[30, 30] == 1 and labels[80, 80] == 0


def test_threshold_applies_to_the_probability() -> None:
    probability = disks((60, 60), [(30, 30, 10)]) * 0.6
    assert label_nuclei(probability, threshold=0.5).max() == 1
    assert label_nuclei(probability, threshold=0.7).max() == 0


def test_block_mean_is_the_mean_of_each_block_and_centres_map_back() -> None:
    probability = np.random.default_rng(1).random((12, 18)).astype(np.float32)
    coarse = block_mean(probability, 3)
    assert coarse.dtype == np.float32
    np.testing.assert_allclose(coarse, probability.reshape(4, 3, 6, 3).mean(axis=(1, 3)), atol=1e-6)
    assert np.array_equal(block_mean(probability, 1), probability)
    with pytest.raises(ValueError, match="multiple"):
        block_mean(probability, 5)
    # Coarse pixel (1, 2) of factor 3 covers fine rows 3-5 and columns 6-8: its centre is (4, 7).
    np.testing.assert_array_equal(from_grid(np.array([[1.0, 2.0]]), 3), [[4.0, 7.0]])
    assert np.array_equal(from_grid(np.array([[1.5, 2.0]]), 1), [[1.5, 2.0]])


def test_centroids_and_edge_contact() -> None:
    labels = np.zeros((50, 50), np.int32)
    labels[10:21, 10:21] = 1  # centroid (15, 15)
    labels[0:5, 30:40] = 2  # touches the top edge
    ids, points = centroids(labels)
    assert ids.tolist() == [1, 2]
    np.testing.assert_allclose(points[0], [15.0, 15.0])
    assert touching_edge(labels).tolist() == [2]


def test_owned_nuclei_have_their_centroid_in_the_core_and_are_not_cut() -> None:
    labels = np.zeros((100, 100), np.int32)
    labels[20:31, 20:31] = 1  # centroid (25, 25): in the core
    labels[45:56, 55:66] = 2  # centroid (50, 60): just outside (the core's x1 is 60, half-open)
    labels[45:56, 40:51] = 3  # centroid (50, 45): in the core
    labels[0:8, 30:40] = 4  # centroid in the core's rows but cut by the window edge
    core = Region(0, 0, 60, 60)
    ids, points = owned_nuclei(labels, core)
    assert ids.tolist() == [1, 3]
    assert points.shape == (2, 2)


@pytest.mark.parametrize("seed", range(5))
def test_hole_filling_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(40):
        height, width = (int(side) for side in rng.integers(1, 50, size=2))
        mask = rng.random((height, width)) < rng.uniform(0.2, 0.9)
        if rng.random() < 0.5:  # blobs with holes and channels as well as speckle
            mask = ndi.binary_dilation(mask)
        np.testing.assert_array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))


def test_hole_filling_edge_cases() -> None:
    ring = np.ones((5, 5), bool)
    ring[1:-1, 1:-1] = False  # one background region, enclosed: a hole
    assert fill_holes(ring).all()
    for mask in (np.zeros((4, 4), bool), np.ones((4, 4), bool), np.zeros((0, 3), bool)):
        np.testing.assert_array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))


def test_nuclei_do_not_depend_on_the_opencv_thread_count() -> None:
    # OpenCV's distance transform rounds differently with its thread count; the nuclei must not follow.
    from synthetic import synthetic_he

    image = synthetic_he((700, 900), seed=11, tissue=0.6)
    probability = np.clip((150.0 - image.mean(axis=-1)) / 40.0 + 0.5, 0.0, 1.0).astype(np.float32)
    threads = cv2.getNumThreads()
    try:
        labelled = []
        for count in (1, 2, 4):
            cv2.setNumThreads(count)
            labelled.append(label_nuclei(probability, split_depth_px=2.0))
    finally:
        cv2.setNumThreads(threads)
    assert labelled[0].max() > 50
    for other in labelled[1:]:
        np.testing.assert_array_equal(other, labelled[0])


def test_a_cluster_is_split_the_same_whatever_else_its_window_holds() -> None:
    # Nuclei seen by two overlapping windows must get the same outlines in both, so the split of a
    # cluster of touching nuclei may depend on the cluster alone.
    from synthetic import synthetic_he

    image = synthetic_he((600, 800), seed=6)  # flooded whole, 3 of its clusters split otherwise
    probability = np.clip((150.0 - image.mean(axis=-1)) / 40.0 + 0.5, 0.0, 1.0).astype(np.float32)
    labels = label_nuclei(probability, split_depth_px=2.0)
    count, pieces = cv2.connectedComponents((labels > 0).astype(np.uint8), connectivity=4)
    clusters = [piece for piece in range(1, count) if len(np.unique(labels[pieces == piece])) >= 2]
    assert len(clusters) >= 10, "the scene should hold clusters of touching nuclei"
    for piece in clusters:
        alone = label_nuclei(np.where(pieces == piece, probability, 0), split_depth_px=2.0)
        inside = pieces == piece
        # The same partition of the cluster's pixels, whatever the numbering.
        pairs = np.unique(np.stack([labels[inside], alone[inside]]), axis=1)
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1], f"cluster {piece}"


def test_the_flood_equals_scikit_image_watershed_piece_by_piece() -> None:
    # _flood calls scikit-image's compiled flood directly; each piece must come out as the public
    # watershed gives it, pieces cut by the array's edge included.
    from skimage.segmentation import watershed
    from synthetic import synthetic_he

    from wsiuda import instances

    assert instances._watershed_raveled is not None, "scikit-image's compiled flood moved"
    image = synthetic_he((500, 700), seed=3)
    probability = np.clip((150.0 - image.mean(axis=-1)) / 40.0 + 0.5, 0.0, 1.0).astype(np.float32)
    for cut in (np.s_[:, :], np.s_[7:, 13:], np.s_[:-5, :-9]):
        foreground = fill_holes(probability[cut] > 0.5)
        distance, markers = instances._markers(foreground, split_depth_px=2.0)
        flooded = instances._flood(-distance, markers, foreground)
        _, pieces = cv2.connectedComponents(foreground.astype(np.uint8), connectivity=4)
        split = 0
        for piece, box in enumerate(ndi.find_objects(pieces), start=1):
            inside = pieces[box] == piece
            if len(np.unique(markers[box][inside & (markers[box] > 0)])) < 2:
                continue
            split += 1
            expected = watershed(-distance[box], np.where(inside, markers[box], 0), mask=inside)
            np.testing.assert_array_equal(flooded[box][inside], expected[inside])
        assert split >= 5, "the scene should hold pieces with several markers"
