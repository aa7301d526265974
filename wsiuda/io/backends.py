"""OpenSlide and tiffslide behind :class:`~wsiuda.io.slide.SlideReader`.

The only place where (x, y) order and the backends' own conventions appear. Backend modules are imported
when a reader is opened, not when wsiuda is imported.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wsiuda.errors import SlideError
from wsiuda.geometry import Region
from wsiuda.io.slide import PLAUSIBLE_MPP, WHITE, SlideInfo, SlideReader

log = logging.getLogger(__name__)


def _float_or_none(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _mpp_from_properties(properties: Mapping[str, Any], prefix: str) -> float | None:
    """The level-0 µm/px; x and y are averaged (they differ in the 4th digit on some scanners).

    Generic TIFFs report their resolution tags as mpp, often a screen's 72 dpi (353 µm/px): a value no
    microscope gives counts as unknown, so the user is asked for --slide-mpp instead of tiling nonsense.
    """
    values = [_float_or_none(properties.get(f"{prefix}.mpp-{axis}")) for axis in ("x", "y")]
    known = [v for v in values if v is not None]
    if not known:
        return None
    mpp = sum(known) / len(known)
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


def _level_origin(region: Region, downsample: float) -> tuple[int, int]:
    """A level-0 (x, y) that both backends map back to exactly ``region``'s level-frame corner.

    The backends divide the level-0 location by the downsample (tiffslide truncates); rounding the product
    up keeps that quotient in [corner, corner + 1) for any downsample >= 1.
    """
    return math.ceil(region.x * downsample), math.ceil(region.y * downsample)


def _to_rgb(pixels: np.ndarray) -> np.ndarray:
    """RGB uint8 from what backends return: RGBA is composited over white (transparent = no tissue)."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    if pixels.shape[-1] == 4:
        alpha = pixels[..., 3:4]
        rgb = pixels[..., :3]
        if alpha.min() == 255:
            pixels = rgb
        else:
            weight = alpha.astype(np.float32) / 255.0
            pixels = np.rint(rgb * weight + WHITE * (1.0 - weight)).astype(np.uint8)
    if pixels.dtype != np.uint8:
        raise SlideError(f"unsupported pixel type {pixels.dtype}; only 8-bit RGB slides are supported")
    return np.ascontiguousarray(pixels[..., :3])


class OpenSlideReader(SlideReader):
    """Any format OpenSlide reads (SVS, NDPI, MRXS, SCN, DICOM, generic tiled TIFF, ...)."""

    def __init__(self, path: Path) -> None:
        import openslide

        self.path = Path(path)
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as error:
            raise SlideError(f"{self.path}: OpenSlide does not recognise this file as a slide") from error
        except openslide.OpenSlideError as error:
            raise SlideError(f"{self.path}: OpenSlide cannot read this slide ({error})") from error
        properties = self._slide.properties
        self.info = SlideInfo(
            path=str(self.path),
            backend="openslide",
            vendor=str(properties.get("openslide.vendor") or "unknown"),
            level_shapes=tuple((int(h), int(w)) for (w, h) in self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            mpp=_mpp_from_properties(properties, "openslide"),
            objective_power=_float_or_none(properties.get("openslide.objective-power")),
        )

    def _read_level_inside(self, region: Region, level: int) -> np.ndarray:
        import openslide

        location = _level_origin(region, self.info.level_downsamples[level])
        try:
            image = self._slide.read_region(location, level, (region.width, region.height))
        except openslide.OpenSlideError as error:
            raise SlideError(
                f"{self.path}: reading {region} at level {level} failed ({error}); "
                "the file may be truncated or corrupt: copy it again"
            ) from error
        return _to_rgb(np.asarray(image))

    def close(self) -> None:
        self._slide.close()


class _TileCache:
    """Decoded TIFF tiles, least recently used out first, up to a byte budget.

    Tiles read with a halo overlap their neighbours: a 576 px read at a 512 px stride touches 16 tiles of
    256 px but only 4 new ones. Keeping decoded tiles saves three decodes out of four in row-major order.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.size = 0
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # a reader may be shared by threads; decoding happens outside it

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile

    def put(self, key: tuple[int, int], tile: np.ndarray) -> None:
        with self._lock:
            if key in self._tiles:
                return
            self._tiles[key] = tile
            self.size += tile.nbytes
            while self.size > self.capacity and len(self._tiles) > 1:
                _, old = self._tiles.popitem(last=False)
                self.size -= old.nbytes


def _directly_tiled(page: Any) -> bool:
    """Whether a TIFF page's tiles can be decoded one by one into RGB (the common slide layout)."""
    return bool(
        page.is_tiled
        and page.planarconfig == 1  # contiguous samples
        and page.samplesperpixel in (3, 4)
        and page.dtype == np.uint8
        and page.imagedepth == 1
        and page.tiledepth == 1
    )


class TiffSlideReader(SlideReader):
    """TIFF-based slides through tiffslide (pure Python over tifffile and imagecodecs).

    Tiled levels are decoded tile by tile from tiffslide's tifffile handle, with decoded tiles cached
    (:class:`_TileCache`); other layouts go through tiffslide's ``read_region``.
    """

    min_cache_bytes = 96 * 2**20
    max_cache_bytes = 512 * 2**20

    def __init__(self, path: Path) -> None:
        import tiffslide

        self.path = Path(path)
        try:
            self._slide = tiffslide.TiffSlide(str(self.path))
            properties = self._slide.properties
            level_dimensions = self._slide.level_dimensions
            level_downsamples = self._slide.level_downsamples
        except Exception as error:  # tiffslide raises whatever tifffile or its metadata parsers raise
            raise SlideError(f"{self.path}: tiffslide cannot read this slide ({error})") from error
        self._pages: list[Any] = []
        try:
            series = self._slide.ts_tifffile.series[int(properties["tiffslide.series-index"])]
            self._pages = [level.keyframe for level in series.levels]
        except Exception:  # no direct access (e.g. unusual series): read_region still works
            log.debug("%s: tile-level access unavailable; using tiffslide.read_region", self.path)
        self._cache = _TileCache(self._cache_budget())
        # What goes through tifffile's handle (tiffslide's read_region) seeks and reads under its lock.
        self._slide.ts_tifffile.filehandle.set_lock(True)
        for page in self._pages:
            # tifffile makes a page's decoder on its first use, and for JPEG it then reads 4 bytes of the
            # first tile through its handle without the lock (TiffPage.is_jfif): a tile read in another
            # thread could start 4 bytes late ("Not a JPEG file: starts with 0x00 0x10", bytes 4-5 of a
            # JFIF header, ended a benchmark run once). Made here, before any thread reads.
            if _directly_tiled(page):
                page.decode  # noqa: B018
        self.info = SlideInfo(
            path=str(self.path),
            backend="tiffslide",
            vendor=str(properties.get("tiffslide.vendor") or "unknown"),
            level_shapes=tuple((int(h), int(w)) for (w, h) in level_dimensions),
            level_downsamples=tuple(float(d) for d in level_downsamples),
            mpp=_mpp_from_properties(properties, "tiffslide"),
            objective_power=_float_or_none(properties.get("tiffslide.objective-power")),
        )
        # Tile bytes come from a descriptor of this reader's own, read at their offsets (pread). No file
        # position is shared, so threads read side by side, and nothing else that moves tifffile's handle
        # without its lock (its page loading does too) can shift a tile read. Without pread, tiles go
        # through tifffile's handle under its lock.
        self._descriptor = os.open(self.path, os.O_RDONLY) if hasattr(os, "pread") else None

    def _cache_budget(self) -> int:
        """Bytes of decoded tiles to keep: four tile rows across the widest tiled level, within bounds.

        Reads in row-major order with a halo reuse the tile rows that the previous row of reads decoded,
        a whole slide width earlier; a cache smaller than that decodes them twice (on a 61440 px wide
        slide with 256 px tiles, one tile row is 47 MB).
        """
        rows = [
            4 * -(-page.imagewidth // page.tilewidth) * page.tilewidth * page.tilelength * 3
            for page in self._pages
            if _directly_tiled(page)
        ]
        return int(min(self.max_cache_bytes, max([self.min_cache_bytes, *rows])))

    def limit_tile_cache(self, max_bytes: int) -> None:
        self._cache.capacity = min(self._cache.capacity, max_bytes)

    def _tile(self, page: Any, level: int, index: int) -> np.ndarray:
        key = (level, index)
        tile = self._cache.get(key)
        if tile is None:
            count = int(page.databytecounts[index])
            height, width = page.tilelength, page.tilewidth
            if count == 0:  # a sparse tile: nothing was scanned there
                tile = np.full((height, width, 3), WHITE, dtype=np.uint8)
            else:
                decoded, _, _ = page.decode(
                    self._tile_bytes(page, int(page.dataoffsets[index]), count),
                    index,
                    jpegtables=page.jpegtables,
                )
                tile = _to_rgb(np.asarray(decoded).reshape(height, width, -1))
            self._cache.put(key, tile)
        return tile

    def _tile_bytes(self, page: Any, offset: int, count: int) -> bytes:
        if self._descriptor is not None:
            return os.pread(self._descriptor, count, offset)  # short at a truncated end: decoding fails
        handle = page.parent.filehandle
        with handle.lock:
            handle.seek(offset)
            return bytes(handle.read(count))

    def _read_tiles(self, region: Region, page: Any, level: int) -> np.ndarray:
        height, width = page.tilelength, page.tilewidth
        across = -(-page.imagewidth // width)
        out = np.empty((region.height, region.width, 3), dtype=np.uint8)
        for ty in range(region.y // height, (region.y1 - 1) // height + 1):
            for tx in range(region.x // width, (region.x1 - 1) // width + 1):
                tile = self._tile(page, level, ty * across + tx)
                y0, x0 = max(region.y, ty * height), max(region.x, tx * width)
                y1, x1 = min(region.y1, (ty + 1) * height), min(region.x1, (tx + 1) * width)
                out[y0 - region.y : y1 - region.y, x0 - region.x : x1 - region.x] = tile[
                    y0 - ty * height : y1 - ty * height, x0 - tx * width : x1 - tx * width
                ]
        return out

    def _read_level_inside(self, region: Region, level: int) -> np.ndarray:
        location = _level_origin(region, self.info.level_downsamples[level])
        try:
            if level < len(self._pages) and _directly_tiled(self._pages[level]):
                return self._read_tiles(region, self._pages[level], level)
            pixels = self._slide.read_region(location, level, (region.width, region.height), as_array=True)
        except Exception as error:  # decoder errors from imagecodecs carry no common base class
            raise SlideError(
                f"{self.path}: reading {region} at level {level} failed ({error}); "
                "the file may be truncated or corrupt: copy it again"
            ) from error
        return _to_rgb(np.asarray(pixels))

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
        self._slide.close()
