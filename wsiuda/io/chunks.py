"""Whole chunks of a zarr v3 array on local disk, written to and read from their chunk files directly.

zarr's own write of a chunk (``array[region] = values``) passes through its asynchronous machinery, which
costs a whole tile's chunk about five times what encoding and writing the file cost (timed by hand: 5.1 ms
of CPU for a 1024² uint32 label chunk against 1.0 ms to compress it with zstd and write the file; a dense
tile's store write in benchmarks/results/nuclei_steps.md). The stores here
write every chunk of a tile whole, so they encode it as zarr would and write the file themselves: the same
bytes under the same key, readable by zarr, dask and napari. A store that reads its chunks one at a time
reads the files too: a tile's features took 0.80 ms through zarr against 0.21 ms from the file (timed by
hand). Arrays whose codecs are other than the
ones handled here are read and written through zarr.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import VLenUTF8, Zstd


def write_chunk_file(path: Path, data: bytes) -> None:
    """Write a chunk file atomically: a temporary file in its folder, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class ChunkFiles:
    """Reads and writes whole chunks of one array of a local zarr v3 store (see the module's docstring)."""

    def __init__(self, array: zarr.Array, root: Path) -> None:
        """``array`` opened from the store in the folder ``root``."""
        self.array = array
        self._folder = root / array.path if array.path else root
        self._codec = _codec(array)

    def write(self, chunk: tuple[int, ...], values: np.ndarray) -> None:
        """Write ``values`` as the chunk at grid position ``chunk``: the chunk's whole extent, or its part
        inside the array where the chunk sticks out past the array's edge."""
        region = self._region(chunk)
        inside = tuple(part.stop - part.start for part in region)
        if tuple(values.shape) != inside:
            raise ValueError(f"chunk {chunk} of {self.array.path} is {inside}, got {values.shape}")
        if self._codec is None:
            self.array[region] = values
            return
        chunks = tuple(self.array.chunks)
        if inside != chunks:  # an edge chunk is stored whole, filled past the array's edge
            whole = np.full(chunks, self.array.fill_value, dtype=values.dtype)
            whole[tuple(slice(0, size) for size in inside)] = values
            values = whole
        write_chunk_file(self._path(chunk), self._codec.encode(values))

    def read(self, chunk: tuple[int, ...]) -> np.ndarray:
        """The chunk at grid position ``chunk``, its part inside the array (the fill value where it was
        never written)."""
        region = self._region(chunk)
        if self._codec is None:
            return np.asarray(self.array[region])
        try:
            data = self._path(chunk).read_bytes()
        except FileNotFoundError:
            shape = tuple(part.stop - part.start for part in region)
            return np.full(shape, self.array.fill_value, dtype=self._codec.dtype)
        whole = self._codec.decode(data, tuple(self.array.chunks))
        return whole[tuple(slice(0, part.stop - part.start) for part in region)]

    def stored_chunks(self) -> list[tuple[int, ...]]:
        """The grid positions of the chunks that have a file; the others hold the fill value.

        Found by listing the chunk folders (zarr v3's default keys, ``c/row/col``), not by a look-up per
        grid position: a 100-tile slide's ``done`` array took 57 ms through zarr, which opens every chunk
        (timed by hand). Under other key encodings every position is checked.
        """
        ndim = len(self.array.shape)
        if self.array.metadata.encode_chunk_key((1,) * ndim) != "/".join(["c"] + ["1"] * ndim):
            grid = itertools.product(*(range(count) for count in self.array.cdata_shape))
            return [chunk for chunk in grid if self._path(chunk).is_file()]
        found: list[tuple[int, ...]] = []

        def walk(folder: Path, prefix: tuple[int, ...]) -> None:
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                return
            for entry in entries:
                if not entry.name.isdigit():  # a write's temporary file
                    continue
                position = (*prefix, int(entry.name))
                if len(position) < ndim:
                    walk(Path(entry.path), position)
                elif entry.is_file():
                    found.append(position)

        walk(self._folder / "c", ())
        return sorted(found)

    def _region(self, chunk: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(
            slice(index * size, min((index + 1) * size, extent))
            for index, size, extent in zip(chunk, self.array.chunks, self.array.shape, strict=True)
        )

    def _path(self, chunk: tuple[int, ...]) -> Path:
        return self._folder / self.array.metadata.encode_chunk_key(chunk)


class _Codec:
    """zarr's encoding of a whole chunk for the codecs the stores here create: a little-endian numeric or
    a UTF-8 string array, then zstd."""

    def __init__(self, dtype: np.dtype[Any], zstd: Zstd, text: VLenUTF8 | None) -> None:
        self.dtype = dtype
        self._zstd = zstd
        self._text = text

    def encode(self, values: np.ndarray) -> bytes:
        if self._text is not None:
            return bytes(self._zstd.encode(self._text.encode(np.asarray(values, dtype=object).ravel())))
        return bytes(self._zstd.encode(np.ascontiguousarray(values, dtype=self.dtype)))

    def decode(self, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
        raw = self._zstd.decode(data)
        if self._text is not None:
            return np.asarray(self._text.decode(raw), dtype=object).reshape(shape)
        return np.frombuffer(raw, dtype=self.dtype).reshape(shape)


def _codec(array: zarr.Array) -> _Codec | None:
    """The :class:`_Codec` of ``array``, or None where its codecs are others."""
    codecs: list[dict[str, Any]] = [codec.to_dict() for codec in array.metadata.codecs]  # type: ignore[union-attr]
    if array.metadata.zarr_format != 3 or len(codecs) != 2 or codecs[1]["name"] != "zstd":
        return None
    zstd_settings = codecs[1].get("configuration", {})
    if zstd_settings.get("checksum", False):
        return None
    zstd = Zstd(level=int(zstd_settings.get("level", 0)))
    serializer, settings = codecs[0]["name"], codecs[0].get("configuration", {})
    if serializer == "bytes" and settings.get("endian", "little") == "little":
        return _Codec(np.dtype(array.dtype).newbyteorder("<"), zstd, None)
    if serializer == "vlen-utf8":
        return _Codec(np.dtype(object), zstd, VLenUTF8())
    return None
