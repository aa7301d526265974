"""One reader interface over OpenSlide, tiffslide and plain image files.

Everything the rest of the library sees is level-0 pixels in (y, x) order and RGB uint8 numpy arrays.
Readers are cheap to open and are opened by path inside each worker; a handle is never pickled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsiuda.geometry import Region


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


class SlideReader(ABC):
    """A slide opened by path. Use as a context manager, or call :meth:`close`."""

    info: SlideInfo

    @abstractmethod
    def read_region(self, region: Region, *, level: int = 0) -> np.ndarray:
        """Pixels of ``region`` (level-0 coordinates) read from ``level``.

        Returns an (h, w, 3) uint8 RGB array with h, w = region size / level downsample (rounded). Parts
        of the region outside the slide are white, as slide backgrounds are.
        """

    def close(self) -> None:  # noqa: B027 - optional for backends holding no resources
        """Release the backend's handle."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_plain_image(path: Path) -> bool:
    """PNG/JPEG are always read as plain images; TIFFs only when they are not pyramidal slides."""
    return Path(path).suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"}
