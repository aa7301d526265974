"""Working resolution, resampling, tissue detection and the tile grid (pure functions, in-memory slides)."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from synthetic import synthetic_he

from wsiuda.errors import SlideError
from wsiuda.geometry import Region
from wsiuda.io import SlideInfo, SlideReader, open_slide
from wsiuda.tiling import (
    TissueMask,
    effective_downsample,
    level_for_scale,
    read_working_region,
    tile_grid,
    tissue_from_rgb,
    tissue_mask,
    working_scale,
    working_shape,
)


class ArrayReader(SlideReader):
    """An in-memory pyramid (each level the previous one area-downsampled by ``step``)."""

    def __init__(
        self, image: np.ndarray, *, mpp: float | None = 0.25, levels: int = 3, step: int = 4
    ) -> None:
        self.levels = [image]
        for _ in range(levels - 1):
            last = self.levels[-1]
            size = (last.shape[1] // step, last.shape[0] // step)
            self.levels.append(cv2.resize(last, size, interpolation=cv2.INTER_AREA))
        self.info = SlideInfo(
            path="memory.svs",
            backend="memory",
            vendor="test",
            level_shapes=tuple(level.shape[:2] for level in self.levels),  # type: ignore[misc]
            level_downsamples=tuple(image.shape[1] / level.shape[1] for level in self.levels),
            mpp=mpp,
            objective_power=None,
        )

    def _read_level_inside(self, region: Region, level: int) -> np.ndarray:
        return self.levels[level][region.as_slices()].copy()


def info(mpp: float | None, power: float | None = None) -> SlideInfo:
    return SlideInfo("s.svs", "test", "test", ((100, 100),), (1.0,), mpp, power)


# ----------------------------------------------------------------------------------------- resolution
def test_working_scale_of_a_20x_slide_at_40x_is_two() -> None:
    assert working_scale(info(0.5), 0.25) == 2.0
    assert working_scale(info(0.25), 0.25) == 1.0
    assert working_scale(info(0.25), 0.5) == 0.5


def test_no_mpp_is_a_clear_error_naming_the_file_and_the_fix() -> None:
    with pytest.raises(
        SlideError, match=r"s\.svs has no mpp in its metadata; pass --slide-mpp 0\.25 \(40x\)"
    ):
        working_scale(info(None), 0.25)


def test_objective_power_alone_is_used_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="wsiuda"):
        assert working_scale(info(None, power=20), 0.25) == pytest.approx(2.0)
    assert "objective power" in caplog.text and "s.svs" in caplog.text


def test_level_choice_is_the_coarsest_at_or_finer_than_needed() -> None:
    downsamples = (1.0, 4.0, 16.0)
    assert level_for_scale(downsamples, 2.0) == 0  # upsampling: level 0
    assert level_for_scale(downsamples, 1.0) == 0
    assert level_for_scale(downsamples, 0.5) == 0  # needs 2x: level 1 (4x) would be too coarse
    assert level_for_scale(downsamples, 0.25) == 1
    assert level_for_scale(downsamples, 0.2) == 1
    assert level_for_scale(downsamples, 1 / 16) == 2
    assert level_for_scale(downsamples, 1 / 100) == 2


def test_reported_downsamples_snap_to_the_pyramid_integer() -> None:
    assert effective_downsample(2.0005055) == 2.0  # tcga-cr-7395: 4443 / 2221
    assert effective_downsample(16.0645) == 16.0
    assert effective_downsample(3.3) == 3.3


def test_working_shape_covers_the_slide() -> None:
    assert working_shape((1000, 1501), 2.0) == (2000, 3002)
    assert working_shape((1000, 1001), 0.5) == (500, 501)


# ----------------------------------------------------------------------------------------- resampling
@pytest.fixture(scope="module")
def pyramid() -> ArrayReader:
    return ArrayReader(synthetic_he((640, 768), seed=3))


@pytest.mark.parametrize("scale", [1.0, 2.0, 3.0, 0.5, 0.25, 1.37, 0.3, 1 / 16])
def test_tiled_read_equals_whole_read_for_awkward_tile_and_halo(pyramid: ArrayReader, scale: float) -> None:
    shape = working_shape(pyramid.info.shape, scale)
    whole = read_working_region(pyramid, Region(0, 0, *shape), scale=scale)
    assert whole.shape == (*shape, 3) and whole.dtype == np.uint8
    tile, halo = 97, 13
    for core in tile_grid(shape, tile=tile, tissue=None, scale=scale, min_tissue=0):
        pixels = read_working_region(pyramid, core.grow(halo), scale=scale)
        assert pixels.shape == (tile + 2 * halo, tile + 2 * halo, 3)
        inside = core.clip(*shape)
        got = pixels[halo : halo + inside.height, halo : halo + inside.width]
        np.testing.assert_array_equal(got, whole[inside.as_slices()], err_msg=f"{core} at scale {scale}")


def test_integer_upsampling_matches_cv2_linear_resize(pyramid: ArrayReader) -> None:
    level0 = pyramid.levels[0]
    expected = cv2.resize(level0, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    got = read_working_region(pyramid, Region(0, 0, *expected.shape[:2]), scale=2.0)
    # Interior only: at the slide's edge we interpolate towards white glass, cv2 replicates the border.
    np.testing.assert_array_equal(got[2:-2, 2:-2], expected[2:-2, 2:-2])


def test_downsampling_reads_the_right_level_and_averages(pyramid: ArrayReader) -> None:
    # Scale 1/4 is exactly level 1: no resampling at all.
    got = read_working_region(pyramid, Region(0, 0, 160, 192), scale=0.25)
    np.testing.assert_array_equal(got, pyramid.levels[1])
    # Scale 1/2 reads level 0 and area-averages 2 x 2 blocks.
    half = read_working_region(pyramid, Region(0, 0, 320, 384), scale=0.5)
    expected = cv2.resize(pyramid.levels[0], (384, 320), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(half, expected)


@pytest.mark.parametrize("scale", [1.37, 1.996, 1.0108])
def test_generic_scale_is_close_to_cv2(pyramid: ArrayReader, scale: float) -> None:
    shape = working_shape(pyramid.info.shape, scale)
    got = read_working_region(pyramid, Region(0, 0, *shape), scale=scale).astype(int)
    expected = cv2.resize(pyramid.levels[0], None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    h, w = min(shape[0], expected.shape[0]) - 4, min(shape[1], expected.shape[1]) - 4
    # The same bilinear kernel on the same grid; we interpolate at positions rounded to 1/32 px (as
    # cv2.remap does), cv2.resize at exact ones: a 1/64 px shift at most, a few levels at sharp edges.
    diff = np.abs(got[4:h, 4:w] - expected[4:h, 4:w])
    assert diff.mean() < 0.3 and np.percentile(diff, 99.9) <= 2 and diff.max() <= 6


def test_outside_the_slide_is_white(pyramid: ArrayReader) -> None:
    pixels = read_working_region(pyramid, Region(-50, -50, 40, 40), scale=2.0)
    assert (pixels == 255).all()


def test_read_through_a_real_pyramidal_file(synthetic_slide_20x: Path) -> None:
    with open_slide(synthetic_slide_20x) as reader:
        scale = working_scale(reader.info, 0.25)
        assert scale == 2.0
        pixels = read_working_region(reader, Region(100, 100, 300, 200), scale=scale)
        level0 = reader.read_level(Region(50, 50, 150, 100), level=0)
    assert pixels.shape == (300, 200, 3)
    # Every other working pixel sits a quarter pixel from a level-0 pixel: close to it, not equal.
    assert np.abs(pixels[1:-1:2, 1:-1:2].astype(int) - level0[:-1, :-1]).mean() < 20


# --------------------------------------------------------------------------------------------- tissue
def test_tissue_from_rgb_finds_the_tissue_ellipse() -> None:
    image = synthetic_he((400, 500), seed=5, tissue=0.5)
    mask = tissue_from_rgb(image)
    assert mask.dtype == bool
    assert mask.mean() == pytest.approx(0.5, abs=0.05)
    assert mask[200, 250] and not mask[5, 5]


def test_blank_glass_has_no_tissue() -> None:
    rng = np.random.default_rng(0)
    glass = np.clip(245 + rng.normal(0, 3, size=(200, 300, 3)), 0, 255).astype(np.uint8)
    assert not tissue_from_rgb(glass).any()


def test_all_tissue_stays_all_tissue() -> None:
    # A patch that is all tissue must not be split at Otsu's threshold between pale and dark tissue.
    assert tissue_from_rgb(synthetic_he((300, 300), seed=1)).mean() > 0.99


def test_tissue_mask_of_a_slide_uses_a_power_of_two_thumbnail(synthetic_slide: Path) -> None:
    with open_slide(synthetic_slide) as reader:
        tissue = tissue_mask(reader, max_side=512)
    assert tissue.pixel_size == 8.0  # 2560 / 512 = 5, rounded up to a power of two
    assert tissue.mask.shape == (256, 320)
    assert tissue.mask.mean() == pytest.approx(0.5, abs=0.05)


# ----------------------------------------------------------------------------------------------- grid
def test_grid_keeps_every_tile_without_tissue_mask() -> None:
    regions = tile_grid((250, 300), tile=100, tissue=None, scale=1.0, min_tissue=0.5)
    assert len(regions) == 3 * 3
    assert regions[0] == Region(0, 0, 100, 100) and regions[-1] == Region(200, 200, 100, 100)


def test_grid_skips_background_tiles_by_tissue_fraction() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[:20, :20] = True  # top-left quarter is tissue
    mask[20:30, 20:40] = True  # half of the bottom-right quarter (rows 20-29)
    tissue = TissueMask(mask=mask, pixel_size=10.0)  # mask covers 400 x 400 level-0 px
    # Working grid at scale 0.5: 200 x 200, tiles of 100 = 200 level-0 px = 20 mask px.
    kept = tile_grid((200, 200), tile=100, tissue=tissue, scale=0.5, min_tissue=0.5)
    assert kept == [Region(0, 0, 100, 100), Region(100, 100, 100, 100)]
    strict = tile_grid((200, 200), tile=100, tissue=tissue, scale=0.5, min_tissue=0.6)
    assert strict == [Region(0, 0, 100, 100)]
    assert len(tile_grid((200, 200), tile=100, tissue=tissue, scale=0.5, min_tissue=0)) == 4


def test_tissue_fraction_counts_outside_the_slide_as_background() -> None:
    tissue = TissueMask(mask=np.ones((10, 10), dtype=bool), pixel_size=1.0)
    fractions = tissue.fractions([Region(0, 0, 10, 10), Region(5, 5, 10, 10)], scale=1.0)
    np.testing.assert_allclose(fractions, [1.0, 0.25])
