"""The zarr v3 tile store that ``wsiuda tile`` writes and ``adapt`` / ``segment`` read.

Layout of ``NAME.zarr`` (a zarr v3 group)::

    zarr.json    attributes["wsiuda"]: format, version, complete flag, tile/halo/codec, and the caller's
                 metadata (source file, size and mtime, backend, mpps, level read, grid, command config)
    tiles/       (N, tile + 2 halo, tile + 2 halo, 3) uint8, one chunk per tile, white fill
    regions/     (N, 4) int64: each tile's core Region (y, x, height, width) in the working grid
    tissue/      the tissue mask (uint8 0/1); attributes["pixel_size"] in level-0 px

A tile is done when its chunk exists: zarr's local store writes each chunk to a temporary file and renames
it, so a killed run leaves whole tiles or none. The store is marked complete only by :meth:`mark_complete`
after the last tile.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from wsiuda._version import __version__
from wsiuda.config import RESUME_FIX, prepare_output_folder, writing
from wsiuda.errors import OutputError, WsiudaError
from wsiuda.geometry import Region
from wsiuda.io.chunks import write_chunk_file
from wsiuda.io.codecs import JpegCodec, register

STORE_FORMAT = "wsiuda.tiles"
FORMAT_VERSION = 1
CODECS = ("jpeg", "zstd")
_CHUNK = re.compile(r"^c\.(\d+)\.0\.0\.0$")

register()


def _attrs_of(path: Path) -> dict[str, Any] | None:
    """The wsiuda attributes of a store at ``path``, or None if it is not a wsiuda tile store."""
    import json

    meta = path / "zarr.json"
    if not meta.is_file():
        return None
    try:
        document = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    attributes = document.get("attributes") if isinstance(document, dict) else None
    attrs = attributes.get("wsiuda") if isinstance(attributes, dict) else None
    if not isinstance(attrs, dict) or attrs.get("format") != STORE_FORMAT:
        return None
    return attrs


def is_tile_store(path: Path) -> bool:
    return _attrs_of(Path(path)) is not None


def _serializer(codec: str, level: int | None) -> dict[str, Any]:
    from zarr.codecs import BytesCodec, ZstdCodec

    if codec == "jpeg":
        return {"serializer": JpegCodec(level=level or 90), "compressors": None}
    if codec == "zstd":
        return {"serializer": BytesCodec(), "compressors": ZstdCodec(level=level or 3)}
    raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


INCOMPLETE = "the tile store is incomplete; finish it with `wsiuda tile` first"
"""Why a store that `wsiuda tile` did not finish is refused, and the fix: it holds part of its slide."""
RETILE = "tile its slide again with `wsiuda tile --overwrite`"
"""The fix for a damaged store."""


@contextmanager
def _damage_reported(path: Path, what: str) -> Iterator[None]:
    """A store's file that zarr or the codec cannot read (a chunk or its metadata overwritten, cut short)
    as one error naming it, so that a batch reports the store and goes on."""
    try:
        yield
    except WsiudaError:
        raise
    except Exception as error:  # zarr, JSON and the codecs raise many types for damaged files
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise OutputError(f"{path}: {what} is damaged ({reason}); {RETILE}") from None


class TileStore:
    """A slide's tiles at the working mpp. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, path: Path, group: Any) -> None:
        self.path = Path(path)
        self._group = group
        # write_empty_chunks is a runtime setting, not stored: without it an all-white tile (equal to the
        # fill value) would leave no chunk behind and never count as done.
        self._tiles = group["tiles"].with_config({"write_empty_chunks": True})
        serializer = self._tiles.metadata.codecs[0]
        self._jpeg = serializer if isinstance(serializer, JpegCodec) and not self._tiles.read_only else None
        self._regions = np.asarray(group["regions"][:], dtype=np.int64)

    # ------------------------------------------------------------------------------------ create / open
    @classmethod
    def create(
        cls,
        path: Path,
        *,
        regions: Sequence[Region],
        tile: int,
        halo: int,
        codec: str = "jpeg",
        level: int | None = None,
        tissue: np.ndarray | None = None,
        tissue_pixel_size: float | None = None,
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> TileStore:
        """A new, empty, incomplete store for ``regions`` (core tiles in the working grid).

        ``level`` is the codec's level: JPEG quality (default 90) or zstd level (default 3). An existing
        wsiuda store is replaced only with ``overwrite``; any other existing path is refused.
        """
        import zarr

        path = Path(path)
        if path.exists() or path.is_symlink():
            if not is_tile_store(path):
                raise OutputError(
                    f"{path} exists and is not a wsiuda tile store; remove it or choose another output folder"
                )
            if not overwrite:
                raise OutputError(f"{path} already exists; pass --overwrite to replace it")
            shutil.rmtree(path)
        if not path.parent.is_dir():
            raise OutputError(f"{path.parent}: output folder does not exist")
        prepare_output_folder(path.parent)
        side = tile + 2 * halo
        attrs = {
            "format": STORE_FORMAT,
            "format_version": FORMAT_VERSION,
            "wsiuda_version": __version__,
            "complete": False,
            "tile": tile,
            "halo": halo,
            "codec": codec,
            "codec_level": level,
            **(metadata or {}),
        }
        try:
            group = zarr.open_group(path, mode="w-", zarr_format=3)
            group.create_array(
                "tiles",
                shape=(len(regions), side, side, 3),
                chunks=(1, side, side, 3),
                dtype="uint8",
                fill_value=255,
                chunk_key_encoding={"name": "default", "separator": "."},
                config={"write_empty_chunks": True},
                dimension_names=("tile", "y", "x", "channel"),
                **_serializer(codec, level),
            )
            boxes = np.array([(r.y, r.x, r.height, r.width) for r in regions], dtype=np.int64).reshape(-1, 4)
            group.create_array("regions", data=boxes, dimension_names=("tile", "yxhw"))
            if tissue is not None:
                mask = group.create_array("tissue", data=tissue.astype(np.uint8), dimension_names=("y", "x"))
                mask.attrs["pixel_size"] = float(tissue_pixel_size or 1.0)
            # The attributes go last: a store is recognised as ours only once its arrays exist.
            group.attrs["wsiuda"] = attrs
        except PermissionError as error:
            raise OutputError(f"{path}: cannot write ({error}); choose another output folder") from error
        return cls(path, zarr.open_group(path, mode="r+", zarr_format=3))

    @classmethod
    def open(cls, path: Path, *, writable: bool = False) -> TileStore:
        import zarr

        path = Path(path)
        if not path.exists():
            raise OutputError(f"{path}: no such tile store")
        if not is_tile_store(path):
            raise OutputError(
                f"{path} is not a wsiuda tile store (damaged, or not made by `wsiuda tile`); {RETILE}"
            )
        with _damage_reported(path, "the store's metadata"):
            return cls(path, zarr.open_group(path, mode="r+" if writable else "r", zarr_format=3))

    # --------------------------------------------------------------------------------------- metadata
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._group.attrs["wsiuda"])

    def update_attrs(self, **values: Any) -> None:
        with writing(self.path, fix=RESUME_FIX):
            self._group.attrs["wsiuda"] = {**self.attrs, **values}

    @property
    def tile(self) -> int:
        return int(self.attrs["tile"])

    @property
    def halo(self) -> int:
        return int(self.attrs["halo"])

    @property
    def is_complete(self) -> bool:
        return bool(self.attrs.get("complete")) and bool(self.done().all())

    def __len__(self) -> int:
        return int(self._regions.shape[0])

    @property
    def core_regions(self) -> list[Region]:
        """Each tile's core (without halo) in the working grid."""
        return [Region(*map(int, row)) for row in self._regions]

    @property
    def regions(self) -> list[Region]:
        """What each stored tile array covers: the core grown by the halo, in the working grid."""
        return [region.grow(self.halo) for region in self.core_regions]

    def tissue_mask(self) -> tuple[np.ndarray, float] | None:
        """The stored tissue mask (bool) and its pixel size in level-0 px, if one was stored."""
        with _damage_reported(self.path, "its tissue mask"):
            if "tissue" not in self._group:
                return None
            array = self._group["tissue"]
            return np.asarray(array[:], dtype=bool), float(array.attrs["pixel_size"])

    # ------------------------------------------------------------------------------------------ tiles
    def done(self) -> np.ndarray:
        """A boolean per tile: whether it has been written (a whole chunk exists)."""
        flags = np.zeros(len(self), dtype=bool)
        folder = self.path / "tiles"
        if folder.is_dir():
            for name in os.listdir(folder):
                match = _CHUNK.match(name)
                if match and int(match.group(1)) < len(self):
                    flags[int(match.group(1))] = True
        return flags

    def write_tile(self, index: int, pixels: np.ndarray) -> None:
        """Store one tile; atomic (a temporary file renamed into place), so a killed writer leaves none."""
        side = self.tile + 2 * self.halo
        if pixels.shape != (side, side, 3) or pixels.dtype != np.uint8:
            raise ValueError(
                f"tile {index} must be ({side}, {side}, 3) uint8, got {pixels.shape} {pixels.dtype}"
            )
        if not 0 <= index < len(self):
            raise IndexError(f"tile {index} is outside this store's {len(self)} tiles")
        with writing(self.path, fix=RESUME_FIX):
            if self._jpeg is None:
                self._tiles[index] = pixels
            else:
                self._write_jpeg_chunk(index, pixels)

    def _write_jpeg_chunk(self, index: int, pixels: np.ndarray) -> None:
        # JPEG chunks are the codec's output alone, so they are written straight to their chunk file:
        # the same bytes zarr would write, without its per-write overhead (a quarter of a tile's CPU time,
        # timed by hand).
        assert self._jpeg is not None
        write_chunk_file(self.path / "tiles" / f"c.{index}.0.0.0", self._jpeg.encode_image(pixels))

    def read_tile(self, index: int) -> np.ndarray:
        with _damage_reported(self.path, f"tile {index}"):
            return np.asarray(self._tiles[index])

    def read_tiles(
        self, indices: Sequence[int] | np.ndarray | None = None
    ) -> tuple[np.ndarray, list[Region]]:
        """Tiles as an (N, H, W, 3) uint8 array, with the working-grid Region each covers (halo included)."""
        chosen = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        if chosen.size == 0:
            side = self.tile + 2 * self.halo
            return np.zeros((0, side, side, 3), dtype=np.uint8), []
        with _damage_reported(self.path, "a tile"):
            pixels = np.asarray(self._tiles.get_orthogonal_selection((chosen,)))
        regions = self.regions
        return pixels, [regions[int(i)] for i in chosen]

    def mark_complete(self) -> None:
        """Flag the store complete; refuses while any tile is missing."""
        missing = int((~self.done()).sum())
        if missing:
            raise OutputError(f"{self.path}: {missing} tiles are missing; rerun the command to finish it")
        self.update_attrs(complete=True)

    def remove_partials(self) -> None:
        """Delete temporary chunk files a killed writer left behind."""
        for partial in (self.path / "tiles").glob("*.partial"):
            partial.unlink(missing_ok=True)
