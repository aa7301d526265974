"""Working resolution, resampling, tissue detection and the tile grid.

Three frames appear here: level 0 of the slide, the level actually read, and the *working grid* at the
target mpp. The working grid is level 0 times ``scale`` (:func:`working_scale`); a working pixel ``Y``
covers level-0 ``[Y / scale, (Y + 1) / scale)``. Reading a working region picks a pyramid level and
resamples it with weights computed from absolute working coordinates, so that a region read in tiles
equals the same region read whole, bit for bit (tests/test_tiling.py checks awkward tile and halo sizes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from wsiuda.errors import SlideError
from wsiuda.geometry import Region, scale_factor
from wsiuda.io.slide import SlideInfo, SlideReader

log = logging.getLogger(__name__)

# Pyramid downsamples are reported as level-size ratios (4443 / 2221 = 2.0005); the scanner's real factor
# is the integer. Snapping within this relative tolerance avoids resampling by 1.0002 everywhere.
DOWNSAMPLE_SNAP = 5e-3
# Factors this close to an integer (or its inverse) take the exact cv2 path.
FACTOR_EPS = 1e-9
MPP_HINT = "pass --slide-mpp 0.25 (40x) or 0.5 (20x)"

SourceReader = Callable[[Region], np.ndarray]
"""Reads a region of a source grid (e.g. one pyramid level) as RGB uint8, white outside the image."""


# --------------------------------------------------------------------------------------------- resolution
def slide_mpp(info: SlideInfo) -> float:
    """Level-0 µm/px: the metadata (or --slide-mpp), else the objective power with a warning."""
    if info.mpp is not None:
        return info.mpp
    if info.objective_power:
        mpp = 10.0 / info.objective_power
        log.warning(
            "%s has no mpp in its metadata; assuming %.3g µm/px from its %gx objective power (%s)",
            info.path,
            mpp,
            info.objective_power,
            MPP_HINT,
        )
        return mpp
    raise SlideError(f"{info.path} has no mpp in its metadata; {MPP_HINT}")


def working_scale(info: SlideInfo, target_mpp: float) -> float:
    """Working pixels per level-0 pixel: 2.0 for a 0.5 µm/px slide worked at 0.25 µm/px."""
    return scale_factor(slide_mpp(info), target_mpp)


def working_shape(level0_shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """(height, width) of the working grid that covers the whole slide."""
    return tuple(max(1, math.ceil(side * scale - 1e-6)) for side in level0_shape)  # type: ignore[return-value]


def effective_downsample(downsample: float) -> float:
    """A level's true downsample: the integer the pyramid was built with when the reported ratio is close."""
    nearest = round(downsample)
    return (
        float(nearest)
        if nearest >= 1 and abs(downsample - nearest) <= DOWNSAMPLE_SNAP * nearest
        else downsample
    )


def level_for_scale(level_downsamples: tuple[float, ...], scale: float) -> int:
    """The coarsest level whose resolution is at or finer than the working grid's."""
    needed = 1.0 / scale
    candidates = [
        (effective_downsample(ds), level)
        for level, ds in enumerate(level_downsamples)
        if effective_downsample(ds) <= needed * (1 + 1e-6)
    ]
    return max(candidates)[1] if candidates else 0


# --------------------------------------------------------------------------------------------- resampling
def _integer(value: float) -> int | None:
    nearest = round(value)
    return nearest if nearest >= 1 and abs(value - nearest) <= FACTOR_EPS * max(1.0, value) else None


def _axis_weights(start: int, count: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, (count, taps) each, for working pixels ``start .. start + count``.

    ``factor`` is working pixels per source pixel. Upsampling interpolates linearly between source pixel
    centres; downsampling averages the source area each working pixel covers. Both depend only on the
    absolute working coordinate, never on where a tile starts.
    """
    positions = np.arange(start, start + count, dtype=np.float64)
    if factor >= 1.0:
        source = (positions + 0.5) / factor - 0.5
        first = np.floor(source)
        frac = source - first
        index = np.stack([first, first + 1], axis=1)
        weight = np.stack([1.0 - frac, frac], axis=1)
    else:
        lo, hi = positions / factor, (positions + 1) / factor
        first = np.floor(lo)
        taps = math.ceil(1.0 / factor) + 1
        index = first[:, None] + np.arange(taps)[None, :]
        overlap = np.minimum(index + 1, hi[:, None]) - np.maximum(index, lo[:, None])
        weight = np.clip(overlap, 0.0, None) * factor
    return index.astype(np.int64), weight.astype(np.float32)


def _apply_axis(pixels: np.ndarray, index: np.ndarray, weight: np.ndarray, axis: int) -> np.ndarray:
    out = None
    for tap in range(index.shape[1]):
        taken = np.take(pixels, index[:, tap], axis=axis)
        shape = [1] * pixels.ndim
        shape[axis] = -1
        term = taken * weight[:, tap].reshape(shape)
        out = term if out is None else out + term
    assert out is not None
    return out


def _remap_linear(read: SourceReader, region: Region, factor: float) -> np.ndarray:
    """Bilinear upsampling by any factor with cv2.remap, tile-invariant.

    cv2 interpolates at positions rounded to 1/32 px. Rounding the absolute source positions to that grid
    first, in float64, makes every position exact in the float32 maps (relative to the crop), so a
    working pixel gets the same weights in every tile that contains it.
    """
    grid = 32.0  # cv2's INTER_TAB_SIZE
    ys = np.round(((np.arange(region.y, region.y1) + 0.5) / factor - 0.5) * grid) / grid
    xs = np.round(((np.arange(region.x, region.x1) + 0.5) / factor - 0.5) * grid) / grid
    y0, x0 = int(np.floor(ys[0])), int(np.floor(xs[0]))
    y1, x1 = int(np.floor(ys[-1])) + 2, int(np.floor(xs[-1])) + 2
    source = read(Region(y0, x0, y1 - y0, x1 - x0))
    map_y = np.ascontiguousarray(np.broadcast_to((ys - y0).astype(np.float32)[:, None], region.shape))
    map_x = np.ascontiguousarray(np.broadcast_to((xs - x0).astype(np.float32)[None, :], region.shape))
    return cv2.remap(source, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def resample_region(read: SourceReader, region: Region, factor: float) -> np.ndarray:
    """Pixels of working ``region`` from a source grid ``factor`` times coarser than the working grid.

    ``read(source_region)`` returns source pixels (white outside the image). Pure apart from ``read``.
    """
    if _integer(factor) == 1:
        return read(region)
    up = _integer(factor)
    if up is not None:
        # Pad one source pixel so interpolation at the region's edge sees real neighbours, not cv2's border.
        y0, x0 = region.y // up - 1, region.x // up - 1
        y1, x1 = -(-region.y1 // up) + 1, -(-region.x1 // up) + 1
        source = read(Region(y0, x0, y1 - y0, x1 - x0))
        big = cv2.resize(source, None, fx=up, fy=up, interpolation=cv2.INTER_LINEAR)
        oy, ox = region.y - y0 * up, region.x - x0 * up
        return np.ascontiguousarray(big[oy : oy + region.height, ox : ox + region.width])
    down = _integer(1.0 / factor)
    if down is not None:
        source = read(Region(region.y * down, region.x * down, region.height * down, region.width * down))
        return cv2.resize(source, (region.width, region.height), interpolation=cv2.INTER_AREA)
    if factor > 1:
        return _remap_linear(read, region, factor)
    rows, row_weight = _axis_weights(region.y, region.height, factor)
    cols, col_weight = _axis_weights(region.x, region.width, factor)
    y0, x0 = int(rows.min()), int(cols.min())
    source = read(Region(y0, x0, int(rows.max()) - y0 + 1, int(cols.max()) - x0 + 1)).astype(np.float32)
    out = _apply_axis(source, rows - y0, row_weight, axis=0)
    out = _apply_axis(out, cols - x0, col_weight, axis=1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def read_working_region(reader: SlideReader, region: Region, *, scale: float) -> np.ndarray:
    """Working-grid ``region`` (level-0 frame times ``scale``) as an exactly (h, w, 3) uint8 RGB array.

    Reads the coarsest level at or finer than the working resolution and resamples it (linear up,
    area down). Outside the slide is white.
    """
    level = level_for_scale(reader.info.level_downsamples, scale)
    factor = scale * effective_downsample(reader.info.level_downsamples[level])

    def read(source: Region) -> np.ndarray:
        return reader.read_level(source, level=level)

    pixels = resample_region(read, region, factor)
    assert pixels.shape == (region.height, region.width, 3), (pixels.shape, region)
    return pixels


# ------------------------------------------------------------------------------------------------- tissue
@dataclass(frozen=True, eq=False)
class TissueMask:
    """A boolean tissue mask; one mask pixel spans ``pixel_size`` level-0 pixels on each axis."""

    mask: np.ndarray
    pixel_size: float

    def fractions(self, regions: list[Region], *, scale: float) -> np.ndarray:
        """Tissue fraction of each working-grid region (area outside the slide counts as background)."""
        if not regions:
            return np.zeros(0, dtype=np.float64)
        integral = cv2.integral(self.mask.astype(np.uint8), sdepth=cv2.CV_64F)
        boxes = np.array([(r.y, r.x, r.y1, r.x1) for r in regions], dtype=np.float64)
        boxes = boxes / (scale * self.pixel_size)
        y0, x0 = np.floor(boxes[:, 0]).astype(np.int64), np.floor(boxes[:, 1]).astype(np.int64)
        y1 = np.maximum(np.ceil(boxes[:, 2]).astype(np.int64), y0 + 1)
        x1 = np.maximum(np.ceil(boxes[:, 3]).astype(np.int64), x0 + 1)
        area = (y1 - y0) * (x1 - x0)
        h, w = self.mask.shape
        cy0, cy1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
        cx0, cx1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
        inside = integral[cy1, cx1] - integral[cy0, cx1] - integral[cy1, cx0] + integral[cy0, cx0]
        return np.asarray(inside / area, dtype=np.float64)


def tissue_from_rgb(
    thumbnail: np.ndarray,
    *,
    min_threshold: int = 15,
    max_threshold: int = 40,
    smooth: int = 5,
    min_object_px: int = 16,
) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: Otsu on HSV saturation, then morphological clean-up.

    Glass is grey-white (low saturation) and H&E is pink/purple. Otsu adapts to stain strength but, on a
    slide that is mostly tissue, would split pale from dark tissue: the threshold is clamped to
    ``[min_threshold, max_threshold]`` (of 255), so pale stroma stays tissue and an empty slide stays empty.
    """
    saturation = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2HSV)[..., 1]
    saturation = cv2.medianBlur(saturation, smooth)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = float(np.clip(otsu, min_threshold, max_threshold))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (smooth, smooth))
    closed = cv2.morphologyEx((saturation > threshold).astype(np.uint8), cv2.MORPH_CLOSE, kernel)
    opened = cv2.morphologyEx(closed, cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    keep = np.zeros(count, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_object_px
    return np.asarray(keep[labels], dtype=bool)


def read_thumbnail(reader: SlideReader, *, pixel_size: float, block: int = 1024) -> np.ndarray:
    """The whole slide at ``pixel_size`` level-0 px per pixel, read block by block so memory stays bounded."""
    scale = 1.0 / pixel_size
    height, width = working_shape(reader.info.shape, scale)
    level = level_for_scale(reader.info.level_downsamples, scale)
    ratio = pixel_size / effective_downsample(reader.info.level_downsamples[level])
    # Keep each source read to ~4096^2 px whatever the pyramid lacks.
    block = max(16, min(block, int(4096 / max(ratio, 1.0))))
    out = np.empty((height, width, 3), dtype=np.uint8)
    for y in range(0, height, block):
        for x in range(0, width, block):
            region = Region(y, x, min(block, height - y), min(block, width - x))
            out[region.as_slices()] = read_working_region(reader, region, scale=scale)
    return out


def tissue_mask(reader: SlideReader, *, max_side: int = 2048, min_side: int = 64) -> TissueMask:
    """Tissue on a thumbnail whose longer side is at most ``max_side`` px.

    The thumbnail's pixel size is a power of two in level-0 px, so pyramids built by halving are read with
    an exact integer downsample.
    """
    longest = max(reader.info.shape)
    pixel_size = float(2 ** max(0, math.ceil(math.log2(max(longest / max_side, 1.0)))))
    while pixel_size > 1 and longest / pixel_size < min_side:
        pixel_size /= 2
    thumbnail = read_thumbnail(reader, pixel_size=pixel_size)
    return TissueMask(mask=tissue_from_rgb(thumbnail), pixel_size=pixel_size)


# --------------------------------------------------------------------------------------------------- grid
def tile_grid(
    working_shape: tuple[int, int],
    *,
    tile: int,
    tissue: TissueMask | None,
    scale: float,
    min_tissue: float,
) -> list[Region]:
    """Core tiles (tile x tile, row-major) of the working grid whose tissue fraction is >= ``min_tissue``.

    Tiles on the last row/column reach past the slide (read as white) so every tile has the same size.
    With ``tissue=None`` or ``min_tissue=0`` every tile is kept.
    """
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    height, width = working_shape
    regions = [Region(y, x, tile, tile) for y in range(0, height, tile) for x in range(0, width, tile)]
    if tissue is None or min_tissue <= 0:
        return regions
    fractions = tissue.fractions(regions, scale=scale)
    return [region for region, fraction in zip(regions, fractions, strict=True) if fraction >= min_tissue]
