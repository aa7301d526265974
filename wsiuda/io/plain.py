"""Plain images (PNG, JPEG, BMP, non-pyramidal TIFF) as one-level slides: patch folders tile alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsiuda.errors import SlideError
from wsiuda.geometry import Region
from wsiuda.io.slide import PLAUSIBLE_MPP, SlideInfo, SlideReader, unreadable

# A plain image is decoded whole (16384^2 RGB is 0.8 GB); larger ones belong in a tiled pyramid.
MAX_PLAIN_PIXELS = 16_384 * 16_384
TOO_LARGE = (
    "is too large to decode whole; convert it to a tiled pyramidal TIFF "
    "(e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`)"
)


def _rgb_uint8(pixels: np.ndarray, path: Path) -> np.ndarray:
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    elif pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    if pixels.dtype != np.uint8:
        raise SlideError(f"{path}: unsupported pixel type {pixels.dtype}; save it as 8-bit RGB")
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    elif pixels.ndim == 3 and pixels.shape[-1] in (1, 2):
        pixels = np.repeat(pixels[..., :1], 3, axis=-1)
    if pixels.ndim != 3 or pixels.shape[-1] < 3:
        raise SlideError(f"{path}: unsupported image layout {pixels.shape}; save it as 8-bit RGB")
    # Alpha is dropped, not composited: patch datasets (e.g. TNBC) carry an opaque alpha channel.
    return np.ascontiguousarray(pixels[..., :3])


def _tiff_mpp(path: Path) -> float | None:
    """µm/px from a TIFF's resolution tags, where they look like a microscope's and not a screen's."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        tags = tif.pages.first.tags
        resolution, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
        if resolution is None or unit is None:
            return None
        numerator, denominator = resolution.value
        if not numerator or not denominator:
            return None
        per_unit = numerator / denominator
        microns = {2: 25_400.0, 3: 10_000.0}.get(int(unit.value))
    if microns is None:
        return None
    mpp = microns / per_unit
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


def _decode(path: Path) -> np.ndarray:
    if path.suffix.lower() in {".tif", ".tiff"}:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if int(np.prod(series.shape[:2])) > MAX_PLAIN_PIXELS:
                raise SlideError(f"{path}: a {series.shape} plain TIFF {TOO_LARGE}")
            pixels = series.asarray()
            if series.axes.startswith("S") and pixels.ndim == 3:  # planar-separate RGB
                pixels = np.moveaxis(pixels, 0, -1)
        return pixels
    from PIL import Image

    with Image.open(path) as image:
        if image.width * image.height > MAX_PLAIN_PIXELS:
            raise SlideError(
                f"{path}: a {image.width}x{image.height} plain image is too large to decode whole"
            )
        image.load()
        if image.mode not in ("RGB", "RGBA", "L"):
            return np.asarray(image.convert("RGB"))
        return np.asarray(image)


class PlainImageReader(SlideReader):
    """A one-level 'slide' decoded whole at open; mpp comes from TIFF tags or the caller."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._pixels = _rgb_uint8(_decode(self.path), self.path)
            mpp = _tiff_mpp(self.path) if self.path.suffix.lower() in {".tif", ".tiff"} else None
        except SlideError:
            raise
        except PermissionError:
            raise SlideError(unreadable(self.path)) from None
        except Exception as error:  # PIL and tifffile raise many types for broken files
            raise SlideError(
                f"{self.path}: cannot decode this image ({error}); it may be truncated or not an image"
            ) from error
        height, width = self._pixels.shape[:2]
        self.info = SlideInfo(
            path=str(self.path),
            backend="plain",
            vendor="plain image",
            level_shapes=((height, width),),
            level_downsamples=(1.0,),
            mpp=mpp,
            objective_power=None,
        )

    def _read_level_inside(self, region: Region, level: int) -> np.ndarray:
        return self._pixels[region.as_slices()].copy()
