"""The one coordinate frame of the library: level-0 pixels, (y, x).

OpenSlide's (x, y) order appears only inside :mod:`wsiuda.io`. A working resolution is an mpp (µm per
pixel); converting between level 0 and the working grid goes through :func:`scale_factor` only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Region:
    """An axis-aligned box: top-left corner (y, x) and size (height, width), in one pixel frame."""

    y: int
    x: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.height < 0 or self.width < 0:
            raise ValueError(f"Region size must be non-negative, got {self.height}x{self.width}")

    @property
    def y1(self) -> int:
        return self.y + self.height

    @property
    def x1(self) -> int:
        return self.x + self.width

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def grow(self, margin: int) -> Region:
        """The region enlarged by ``margin`` pixels on every side (may leave the image)."""
        return Region(self.y - margin, self.x - margin, self.height + 2 * margin, self.width + 2 * margin)

    def clip(self, height: int, width: int) -> Region:
        """The part of the region inside an image of the given size."""
        y0, x0 = max(self.y, 0), max(self.x, 0)
        y1, x1 = min(self.y1, height), min(self.x1, width)
        return Region(y0, x0, max(y1 - y0, 0), max(x1 - x0, 0))

    def scaled(self, factor: float) -> Region:
        """The region in a frame ``factor`` times finer (factor > 1 enlarges), snapped outward to pixels."""
        y0, x0 = int(self.y * factor // 1), int(self.x * factor // 1)
        y1, x1 = -int(-self.y1 * factor // 1), -int(-self.x1 * factor // 1)
        return Region(y0, x0, y1 - y0, x1 - x0)

    def contains(self, other: Region) -> bool:
        """Whether ``other`` (in the same frame) lies wholly inside this region."""
        return self.y <= other.y and self.x <= other.x and other.y1 <= self.y1 and other.x1 <= self.x1

    def on_grid(self, step: int, *, origin: tuple[int, int] = (0, 0), within: tuple[int, int]) -> Region:
        """The region with its edges moved onto a grid of ``step`` px, inside an image of size ``within``.

        The grid's lines lie at multiples of ``step`` in an outer frame in which this region's frame
        starts at ``origin`` (y, x). Edges move outward, or inward where outward leaves the image.
        """
        y0, y1 = _edges_on_grid(self.y, self.y1, step=step, offset=origin[0], size=within[0])
        x0, x1 = _edges_on_grid(self.x, self.x1, step=step, offset=origin[1], size=within[1])
        return Region(y0, x0, max(y1 - y0, 0), max(x1 - x0, 0))

    def as_slices(self) -> tuple[slice, slice]:
        return (slice(self.y, self.y1), slice(self.x, self.x1))


def scale_factor(slide_mpp: float, target_mpp: float) -> float:
    """How many working-grid pixels one level-0 pixel spans: > 1 means the slide is upsampled.

    A 20x slide (0.5 µm/px) worked at 0.25 µm/px gives 2.0.
    """
    if slide_mpp <= 0 or target_mpp <= 0:
        raise ValueError(f"mpp must be positive, got slide {slide_mpp}, target {target_mpp}")
    return slide_mpp / target_mpp


def _edges_on_grid(start: int, stop: int, *, step: int, offset: int, size: int) -> tuple[int, int]:
    """[start, stop) of one axis moved onto multiples of ``step`` of the outer frame, within [0, size)."""
    low = (offset + start) // step * step - offset
    if low < 0:
        low += step
    high = -(-(offset + stop) // step) * step - offset
    if high > size:
        high -= step
    return low, high
