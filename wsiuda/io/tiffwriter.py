"""Write an image as an Aperio-style pyramidal SVS (tiled TIFF levels) that OpenSlide and tiffslide open.

Used by the demo to turn a plain image into a slide, and by the tests and benchmarks for synthetic slides.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np


def _aperio_description(
    shape: tuple[int, int], level_shape: tuple[int, int], *, mpp: float, app_mag: int, tile: int
) -> str:
    height, width = shape
    lh, lw = level_shape
    size = (
        f"{width}x{height} [0,0 {width}x{height}]"
        if level_shape == shape
        else f"{width}x{height} -> {lw}x{lh}"
    )
    return (
        f"Aperio Image Library v12.0.15 \r\n{size} ({tile}x{tile}) JPEG/RGB Q=90"
        f"|AppMag = {app_mag}|MPP = {mpp}|ScanScope ID = SYNTHETIC|Filename = synthetic"
    )


def _level_strips(image: np.ndarray, factor: int, rows: int) -> Iterator[np.ndarray]:
    """The image downsampled by an integer ``factor`` (box mean), ``rows`` output rows at a time."""
    height, width = image.shape[0] // factor, image.shape[1] // factor
    for y in range(0, height, rows):
        y1 = min(y + rows, height)
        strip = np.asarray(image[y * factor : y1 * factor, : width * factor])
        if factor > 1:
            strip = cv2.resize(strip, (width, y1 - y), interpolation=cv2.INTER_AREA)
        yield strip


def _tiles(image: np.ndarray, factor: int, tile: int) -> Iterator[np.ndarray]:
    """Row-major tiles of a level, each padded to tile x tile with white."""
    for strip in _level_strips(image, factor, tile):
        for x in range(0, strip.shape[1], tile):
            block = np.full((tile, tile, 3), 255, dtype=np.uint8)
            part = strip[:, x : x + tile]
            block[: part.shape[0], : part.shape[1]] = part
            yield block


def write_pyramidal_tiff(
    path: Path,
    image: np.ndarray,
    *,
    mpp: float,
    app_mag: int,
    tile: int = 256,
    levels: int = 3,
    jpeg: bool = True,
) -> Path:
    """Write ``image`` as an Aperio-style SVS: tiled levels downsampled by 4, JPEG (or lossless) tiles.

    Level k is level 0 box-averaged by 4**k (sizes floor-divided), like a scanner's pyramid; page 1 is a
    strip thumbnail as Aperio files have. ``image`` may be a np.memmap: it is read in strips, so slides far
    larger than memory can be written.
    """
    import tifffile

    path = Path(path)
    height, width = image.shape[:2]
    factors = [4**k for k in range(levels) if min(height, width) // 4**k >= 1]
    compression: dict[str, object] = (
        {"compression": "jpeg", "compressionargs": {"level": 90}} if jpeg else {"compression": "zlib"}
    )
    with tifffile.TiffWriter(path, bigtiff=height * width * 3 > 2**31) as tif:
        for index, factor in enumerate(factors):
            level_shape = (height // factor, width // factor)
            description = _aperio_description(
                (height, width), level_shape, mpp=mpp, app_mag=app_mag, tile=tile
            )
            tif.write(
                _tiles(image, factor, tile),
                shape=(*level_shape, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                description=description,
                metadata=None,
                **compression,  # type: ignore[arg-type]
            )
            if index == 0:
                thumb_factor = max(1, max(height, width) // 256)
                thumbnail = np.concatenate(list(_level_strips(image, thumb_factor, 4096)), axis=0)
                tif.write(
                    thumbnail,
                    photometric="rgb",
                    description=_aperio_description(
                        (height, width), thumbnail.shape[:2], mpp=mpp, app_mag=app_mag, tile=tile
                    ),
                    metadata=None,
                    compression="jpeg" if jpeg else "zlib",
                )
    return path
