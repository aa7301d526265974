"""I/O at the edges: slide readers, zarr stores, GeoJSON. The only place OpenSlide's (x, y) order appears."""

from wsiuda.io.dispatch import open_slide
from wsiuda.io.slide import SlideInfo, SlideReader

__all__ = ["SlideInfo", "SlideReader", "open_slide"]
