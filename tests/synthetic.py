"""Synthetic H&E images for tests and benchmarks (slides are written by wsiuda.io.tiffwriter).

Plain functions (no pytest) so benchmarks and other test modules can import them; the session fixtures
that use them live in tests/conftest.py.
"""

from __future__ import annotations

import cv2
import numpy as np

from wsiuda.io.tiffwriter import write_pyramidal_tiff

__all__ = ["synthetic_he", "write_pyramidal_tiff"]

PINK = (236, 176, 208)
NUCLEUS = (84, 52, 132)
GLASS = (244, 244, 246)


def synthetic_he(shape: tuple[int, int], *, seed: int, tissue: float = 1.0) -> np.ndarray:
    """An (h, w, 3) uint8 RGB H&E-like image: dark purple disks (nuclei) on pink (eosin), with noise.

    ``tissue`` < 1 leaves a margin of white-grey glass around a central tissue ellipse covering roughly
    that fraction of the image, so tissue detection has something to find.
    """
    height, width = shape
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = PINK
    # ~1 nucleus per 45 x 45 px, radius 6-14 px: about 40x density and size.
    count = max(1, height * width // 2000)
    centres_y = rng.integers(0, height, count)
    centres_x = rng.integers(0, width, count)
    radii = rng.integers(6, 15, count)
    shades = rng.integers(-25, 26, count)
    for cy, cx, radius, shade in zip(centres_y, centres_x, radii, shades, strict=True):
        colour = tuple(int(np.clip(c + shade, 0, 255)) for c in NUCLEUS)
        cv2.circle(image, (int(cx), int(cy)), int(radius), colour, thickness=-1, lineType=cv2.LINE_AA)
    if tissue < 1.0:
        yy, xx = np.ogrid[:height, :width]
        # An ellipse with semi-axes a*h/2, a*w/2 covers pi/4 * a^2 of the image.
        a = min(1.0, np.sqrt(tissue / (np.pi / 4)))
        inside = ((yy - height / 2) / (a * height / 2)) ** 2 + ((xx - width / 2) / (a * width / 2)) ** 2 <= 1
        image[~inside] = GLASS
    noise = rng.integers(-6, 7, size=(height, width, 1), dtype=np.int16)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
