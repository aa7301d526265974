"""One reader interface over OpenSlide, tiffslide and plain image files.

Everything the rest of the library sees is level-0 pixels in (y, x) order and RGB uint8 numpy arrays.
Readers are cheap to open and are opened by path inside each worker; a handle is never pickled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from wsiuda.geometry import Region

PLAIN_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
WHITE = 255
# µm/px outside this range are screen defaults (72 dpi is 353 µm/px) or junk, not a microscope's.
PLAUSIBLE_MPP = (0.05, 20.0)


@dataclass(frozen=True)
class SlideInfo:
    """What a reader knows about a slide. Sizes are (height, width)."""

    path: str
    backend: str
    vendor: str
    level_shapes: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    """Level-0 µm/px from the metadata (or the user's --slide-mpp); None where unknown."""
    objective_power: float | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.level_shapes[0]

    @property
    def level_count(self) -> int:
        return len(self.level_shapes)

    def with_mpp(self, mpp: float | None) -> SlideInfo:
        """The same slide with its level-0 resolution replaced (the user's --slide-mpp wins)."""
        return self if mpp is None else replace(self, mpp=float(mpp))


class SlideReader(ABC):
    """A slide opened by path. Use as a context manager, or call :meth:`close`.

    Backends implement :meth:`_read_level_inside` only; clipping to the slide and white padding live here,
    once, so every backend pads the same way.
    """

    info: SlideInfo

    @abstractmethod
    def _read_level_inside(self, region: Region, level: int) -> np.ndarray:
        """Pixels of ``region`` given in ``level``'s own pixel frame and lying wholly inside that level.

        Returns an RGB uint8 array of exactly ``region.shape + (3,)``.
        """

    def limit_tile_cache(self, max_bytes: int) -> None:  # noqa: B027 - a no-op unless a backend caches
        """Keep at most ``max_bytes`` of decoded tiles; a backend without a tile cache has nothing to do."""

    def read_level(self, region: Region, *, level: int) -> np.ndarray:
        """Pixels of ``region`` given in ``level``'s own pixel frame (not level 0): exact, no resampling.

        Returns an (region.height, region.width, 3) uint8 RGB array; parts outside the slide are white.
        """
        height, width = self.info.level_shapes[level]
        inside = region.clip(height, width)
        if inside == region:
            return self._read_level_inside(region, level)
        out = np.full((region.height, region.width, 3), WHITE, dtype=np.uint8)
        if inside.height == 0 or inside.width == 0:
            return out
        pixels = self._read_level_inside(inside, level)
        oy, ox = inside.y - region.y, inside.x - region.x
        out[oy : oy + inside.height, ox : ox + inside.width] = pixels
        return out

    def read_region(self, region: Region, *, level: int = 0) -> np.ndarray:
        """Pixels of ``region`` (level-0 coordinates) read from ``level``.

        Returns an (h, w, 3) uint8 RGB array with h, w = region size / level downsample (rounded). Parts
        of the region outside the slide are white, as slide backgrounds are.
        """
        ds = self.info.level_downsamples[level]
        y0, x0 = int(np.floor(region.y / ds)), int(np.floor(region.x / ds))
        height, width = round(region.height / ds), round(region.width / ds)
        return self.read_level(Region(y0, x0, height, width), level=level)

    def close(self) -> None:  # noqa: B027 - optional for backends holding no resources
        """Release the backend's handle."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_plain_image(path: Path) -> bool:
    """PNG/JPEG/BMP are always read as plain images; TIFFs only when they are not pyramidal slides."""
    return Path(path).suffix.lower() in PLAIN_IMAGE_SUFFIXES


def unreadable(path: Path) -> str:
    """The error for a file this process may not read, with the fix."""
    return f"{path}: permission denied; give read access to it (chmod +r) or copy it somewhere readable"
