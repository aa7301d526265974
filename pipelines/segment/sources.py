"""The inputs of ``wsiuda segment`` (slides, tile stores, folders of them) and reading their windows."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsiuda.errors import ConfigError
from wsiuda.geometry import Region

SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"}
    | {".png", ".jpg", ".jpeg", ".bmp"}
)


@dataclass(frozen=True)
class SourceSpec:
    """An input opened by path inside each worker."""

    path: str
    kind: str  # "slide" or "tiles"
    backend: str = "auto"
    slide_mpp: float | None = None

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def stem(self) -> str:
        name = Path(self.path).name
        for suffix in (".zarr", *sorted(SLIDE_SUFFIXES, key=len, reverse=True)):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return Path(self.path).stem


def expand_inputs(inputs: Sequence[str], *, backend: str, slide_mpp: float | None) -> list[SourceSpec]:
    """Slides, tile stores and folders → one source per slide (folders: their slides and images, sorted).

    A path that does not exist is kept: it fails, with its reason, when its turn comes.
    """
    from wsiuda.io.store import is_tile_store

    sources: list[SourceSpec] = []
    for raw in inputs:
        path = Path(raw)
        # A zarr store named directly is taken for a tile store, so that a damaged one fails on its turn
        # with its reason; in a folder, only wsiuda's tile stores count.
        if path.is_dir() and (is_tile_store(path) or (path / "zarr.json").is_file()):
            sources.append(SourceSpec(str(path), "tiles", backend, slide_mpp))
        elif path.is_dir():
            members = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
            stores = sorted(p for p in path.iterdir() if p.is_dir() and is_tile_store(p))
            if not members and not stores:
                raise ConfigError(f"{path}: folder holds no slides, images or tile stores")
            sources += [SourceSpec(str(p), "slide", backend, slide_mpp) for p in members]
            sources += [SourceSpec(str(p), "tiles", backend, slide_mpp) for p in stores]
        else:
            sources.append(SourceSpec(str(path), "slide", backend, slide_mpp))
    return sources


SHARED_TILE_CACHE_BYTES = 64 * 2**20
"""Decoded slide tiles a worker process keeps across its tasks (see :func:`shared_reader`): enough for the
tile rows that the next row of windows reads again, on tissue up to about 25,000 px wide with 256 px tiles,
and bounded whatever the slide's size."""

_SHARED: dict[tuple[SourceSpec, float, tuple[int, int]], WindowReader] = {}
_SHARED_LOCK = threading.Lock()
_SHARED_KEPT = 4


def shared_reader(source: SourceSpec, scale: float) -> WindowReader:
    """A reader of a slide that this process's tasks share, opened by path the first time one asks.

    A window overlaps the windows beside and above it by its halo: with the reader and its decoded tiles
    kept from task to task, those tiles are decoded once instead of two to four times. Backends' readers
    are safe to share between threads. The reader of a file that has changed since is opened anew; the
    last few slides' readers are kept.
    """
    status = os.stat(source.path)
    key = (source, scale, (status.st_mtime_ns, status.st_size))
    with _SHARED_LOCK:
        reader = _SHARED.pop(key, None)
        if reader is None:
            reader = WindowReader(source, scale, tile_cache_bytes=SHARED_TILE_CACHE_BYTES)
        _SHARED[key] = reader  # last used last
        while len(_SHARED) > _SHARED_KEPT:  # dropped, not closed: a task may still be reading
            _SHARED.pop(next(iter(_SHARED)))
        return reader


def close_shared_readers() -> None:
    """Close this process's shared readers (once no task is reading)."""
    with _SHARED_LOCK:
        readers = list(_SHARED.values())
        _SHARED.clear()
    for reader in readers:
        reader.close()


class WindowReader:
    """Reads working-grid regions of a source: a slide resampled to the working mpp, or a tile store."""

    def __init__(self, source: SourceSpec, scale: float, *, tile_cache_bytes: int | None = None) -> None:
        self.source = source
        self.scale = scale
        self._reader: Any = None
        self._store: Any = None
        self._cache: dict[int, np.ndarray] = {}
        if source.kind == "tiles":
            from wsiuda.io.store import TileStore

            self._store = TileStore.open(Path(source.path))
            self._cores = self._store.core_regions
            self._tile = self._store.tile
            self._by_grid = {(c.y // self._tile, c.x // self._tile): i for i, c in enumerate(self._cores)}
        else:
            from wsiuda.io import open_slide

            self._reader = open_slide(source.path, backend=source.backend, slide_mpp=source.slide_mpp)
            if tile_cache_bytes is not None:
                self._reader.limit_tile_cache(tile_cache_bytes)

    def read(self, region: Region) -> np.ndarray:
        if self._reader is not None:
            from wsiuda.tiling import read_working_region

            return read_working_region(self._reader, region, scale=self.scale)
        return self._read_store(region)

    def _read_store(self, region: Region) -> np.ndarray:
        """Assemble a region from the stored tiles around it; white where no tile was stored."""
        out = np.full((region.height, region.width, 3), 255, np.uint8)
        halo, tile = self._store.halo, self._tile
        reach = -(-halo // tile)
        rows = range(region.y // tile - reach, (region.y1 - 1) // tile + reach + 1)
        cols = range(region.x // tile - reach, (region.x1 - 1) // tile + reach + 1)
        hits = [self._by_grid[(r, c)] for r in rows for c in cols if (r, c) in self._by_grid]
        # Halos first, cores on top: where a halo and a neighbour's core overlap, the core wins.
        for with_halo in (True, False):
            for index in hits:
                core = self._cores[index]
                pixels = self._tile_pixels(index)
                part = core.grow(halo) if with_halo else core
                offset = halo if not with_halo else 0
                _paste(out, region, part, pixels[offset : offset + part.height, offset : offset + part.width])
        return out

    def _tile_pixels(self, index: int) -> np.ndarray:
        if index not in self._cache:
            if len(self._cache) > 32:
                self._cache.pop(next(iter(self._cache)))
            self._cache[index] = self._store.read_tile(index)
        return self._cache[index]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def _paste(out: np.ndarray, frame: Region, part: Region, pixels: np.ndarray) -> None:
    """Copy ``pixels`` (covering ``part``) into ``out`` (covering ``frame``) where they overlap."""
    y0, x0 = max(frame.y, part.y), max(frame.x, part.x)
    y1, x1 = min(frame.y1, part.y1), min(frame.x1, part.x1)
    if y1 <= y0 or x1 <= x0:
        return
    out[y0 - frame.y : y1 - frame.y, x0 - frame.x : x1 - frame.x] = pixels[
        y0 - part.y : y1 - part.y, x0 - part.x : x1 - part.x
    ]
