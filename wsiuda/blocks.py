"""Core/halo tile geometry for blockwise inference, ownership of objects, and stitching.

A slide's working grid is cut into *cores*: a regular grid of ``tile``-px squares (clipped at the image's
bottom/right edge). Each core is predicted from a larger *read window*: the core grown by a halo wide
enough that (1) every pixel of a nucleus whose centroid lies in the core is inside the window, and (2) each
such pixel sees the whole context the network and the CRF use. A nucleus is then written by exactly one
block, the one whose core holds its centroid (:func:`is_responsible`), and its outline comes whole from
that block's window.

All regions here are in the working frame (pixels at the working mpp, (y, x)).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsiuda.geometry import Region


def halo_px(*, receptive_field_px: int, crf_reach_px: int, nucleus_reach_px: int) -> int:
    """The halo (px on each side) a core needs so that its nuclei come out whole and exact.

    A nucleus owned by the core (centroid inside) reaches at most ``nucleus_reach_px`` beyond the core
    (see :func:`nucleus_reach_px`); each of its pixels needs half the network's receptive field of image
    around it, and the CRF then mixes in values from up to ``crf_reach_px`` further (0 without the CRF).
    """
    if min(receptive_field_px, crf_reach_px, nucleus_reach_px) < 0:
        raise ValueError("halo components must be non-negative")
    return math.ceil(receptive_field_px / 2) + crf_reach_px + nucleus_reach_px


def nucleus_reach_px(diameter_px: float) -> int:
    """How far a nucleus of at most ``diameter_px`` can extend from its centroid.

    The centroid of a convex 2-D shape divides every chord through it at most 2:1 (Minkowski), so no point
    lies further than 2/3 of the diameter from it; nuclei are close to convex.
    """
    return math.ceil(2.0 / 3.0 * diameter_px)


@dataclass(frozen=True)
class Block:
    """One unit of work: the core it owns and the window it reads, both in the working frame."""

    index: tuple[int, int]
    """(row, column) of the core in the tile grid."""
    core: Region
    """The pixels this block owns and writes; inside the image."""
    window: Region
    """The pixels read and predicted: the core plus its halo; may extend past the image edges."""

    @property
    def core_in_window(self) -> Region:
        """The core in the window's own pixel frame."""
        return Region(
            self.core.y - self.window.y, self.core.x - self.window.x, self.core.height, self.core.width
        )

    def crop_core(self, array: np.ndarray) -> np.ndarray:
        """The core part of an array computed over the window (leading axes are the window's y, x)."""
        if tuple(array.shape[:2]) != self.window.shape:
            raise ValueError(f"array {array.shape[:2]} does not match the window {self.window.shape}")
        return array[self.core_in_window.as_slices()]


def window_size(*, tile: int, halo: int, align: int = 1) -> int:
    """Side of every read window: a core, two halos and the slack needed to align the window's origin."""
    return _round_up(halo + (align - 1) + tile + halo, align)


def block_for(core: Region, *, tile: int, halo: int, align: int = 1) -> Block:
    """The block of a core of the regular ``tile`` grid.

    The window's origin is snapped down to a multiple of ``align`` (the network's total stride), so that
    pooling layers see every pixel at the same phase in every window and in the whole image; with that,
    a window's prediction in the core equals the whole-image prediction. All windows have the same size
    (:func:`window_size`), so blocks batch together.
    """
    if tile < 1 or halo < 0 or align < 1:
        raise ValueError(f"bad block geometry: tile={tile}, halo={halo}, align={align}")
    if core.y % tile or core.x % tile or core.height > tile or core.width > tile:
        raise ValueError(f"{core} is not a core of the {tile}-px grid")
    size = window_size(tile=tile, halo=halo, align=align)
    y0 = math.floor((core.y - halo) / align) * align
    x0 = math.floor((core.x - halo) / align) * align
    return Block(index=(core.y // tile, core.x // tile), core=core, window=Region(y0, x0, size, size))


def grid_cores(shape: tuple[int, int], *, tile: int) -> list[Region]:
    """Every core of the regular ``tile`` grid over an image of ``shape`` (row-major)."""
    height, width = shape
    return [
        Region(y, x, min(tile, height - y), min(tile, width - x))
        for y in range(0, height, tile)
        for x in range(0, width, tile)
    ]


def plan_blocks(cores: Iterable[Region], *, tile: int, halo: int, align: int = 1) -> list[Block]:
    """Blocks for the given cores of the ``tile`` grid, in row-major order."""
    return sorted(
        (block_for(core, tile=tile, halo=halo, align=align) for core in cores), key=lambda b: b.index
    )


def grid_shape(shape: tuple[int, int], *, tile: int) -> tuple[int, int]:
    """(rows, columns) of the tile grid over an image of ``shape``."""
    return (-(-shape[0] // tile), -(-shape[1] // tile))


def is_responsible(core: Region, y: float, x: float) -> bool:
    """Whether the block with this core owns an object whose reference point (e.g. centroid) is (y, x).

    Cores tile the image without overlap and the test is half-open, so each point has exactly one owner.
    """
    return core.y <= y < core.y1 and core.x <= x < core.x1


def stitch(block: Block, values: np.ndarray, out: Any) -> None:
    """Write the core part of a window-sized array into ``out`` (numpy, zarr, or any sliceable array)."""
    out[block.core.as_slices()] = block.crop_core(values)


def batches(blocks: list[Block], size: int) -> Iterator[list[Block]]:
    """Consecutive groups of at most ``size`` blocks."""
    for start in range(0, len(blocks), size):
        yield blocks[start : start + size]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
