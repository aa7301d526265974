"""The zarr v3 tile store: layout, codecs, resumable writes, completion, refusing paths not ours."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic import synthetic_he

from wsiuda.errors import OutputError
from wsiuda.geometry import Region
from wsiuda.io.store import TileStore, is_tile_store

REGIONS = [Region(0, 0, 64, 64), Region(0, 64, 64, 64), Region(64, 0, 64, 64)]


def make(path: Path, **kwargs: object) -> TileStore:
    options: dict[str, object] = {"regions": REGIONS, "tile": 64, "halo": 8, "codec": "zstd"}
    options.update(kwargs)
    return TileStore.create(path, **options)  # type: ignore[arg-type]


def tiles(count: int) -> list[np.ndarray]:
    return [synthetic_he((80, 80), seed=seed) for seed in range(count)]


def test_zstd_store_round_trips_exactly_with_regions_and_metadata(tmp_path: Path) -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True
    store = make(tmp_path / "s.zarr", tissue=mask, tissue_pixel_size=32.0, metadata={"source": {"path": "x"}})
    images = tiles(3)
    for index, image in enumerate(images):
        store.write_tile(index, image)
    store.mark_complete()

    reopened = TileStore.open(tmp_path / "s.zarr")
    assert reopened.is_complete and len(reopened) == 3
    pixels, regions = reopened.read_tiles()
    assert pixels.shape == (3, 80, 80, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, np.stack(images))
    assert regions == [r.grow(8) for r in REGIONS]
    assert reopened.core_regions == REGIONS
    some, some_regions = reopened.read_tiles([2, 0])
    np.testing.assert_array_equal(some, np.stack([images[2], images[0]]))
    assert some_regions == [REGIONS[2].grow(8), REGIONS[0].grow(8)]
    stored_mask = reopened.tissue_mask()
    assert stored_mask is not None
    np.testing.assert_array_equal(stored_mask[0], mask)
    assert stored_mask[1] == 32.0
    attrs = reopened.attrs
    assert attrs["format"] == "wsiuda.tiles" and attrs["source"] == {"path": "x"}
    assert (attrs["tile"], attrs["halo"], attrs["codec"]) == (64, 8, "zstd")


def test_jpeg_store_is_close_and_plain_zarr_reads_it(tmp_path: Path) -> None:
    store = make(tmp_path / "j.zarr", codec="jpeg", level=90)
    image = tiles(1)[0]
    store.write_tile(1, image)
    back = store.read_tile(1).astype(int)
    assert np.abs(back - image).mean() < 3
    # The codec is registered through the zarr.codecs entry point: plain zarr, with no wsiuda import
    # in the script, decodes the tiles.
    code = "import sys, zarr; a = zarr.open_array(sys.argv[1]); print(a.shape, int(a[1].mean()))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "j.zarr" / "tiles")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert f"(3, 80, 80, 3) {int(back.mean())}" in done.stdout


def test_jpeg_tiles_written_directly_are_the_bytes_zarr_writes(tmp_path: Path) -> None:
    import zarr

    store = make(tmp_path / "j.zarr", codec="jpeg")
    image = tiles(1)[0]
    store.write_tile(0, image)  # straight to the chunk file
    zarr.open_array(tmp_path / "j.zarr" / "tiles", mode="r+")[1] = image  # through zarr
    folder = tmp_path / "j.zarr" / "tiles"
    assert (folder / "c.0.0.0.0").read_bytes() == (folder / "c.1.0.0.0").read_bytes()
    assert not list(folder.glob("*.partial"))
    with pytest.raises(IndexError):
        store.write_tile(3, image)


def test_done_flags_and_completion_only_after_the_last_tile(tmp_path: Path) -> None:
    store = make(tmp_path / "s.zarr")
    assert not store.done().any() and not store.is_complete
    store.write_tile(1, tiles(1)[0])
    np.testing.assert_array_equal(store.done(), [False, True, False])
    with pytest.raises(OutputError, match="2 tiles are missing"):
        store.mark_complete()
    # An all-white tile equals the fill value; it must still count as written.
    white = np.full((80, 80, 3), 255, dtype=np.uint8)
    store.write_tile(0, white)
    store.write_tile(2, white)
    assert store.done().all()
    assert not TileStore.open(tmp_path / "s.zarr").is_complete
    store.mark_complete()
    assert TileStore.open(tmp_path / "s.zarr").is_complete


def test_partial_chunk_files_do_not_count_and_are_removed(tmp_path: Path) -> None:
    store = make(tmp_path / "s.zarr")
    partial = tmp_path / "s.zarr" / "tiles" / "c.0.0.0.3f2a.partial"
    partial.write_bytes(b"half a chunk")
    assert not store.done().any()
    store.remove_partials()
    assert not partial.exists()


def test_wrong_tile_shape_is_refused(tmp_path: Path) -> None:
    store = make(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="must be"):
        store.write_tile(0, np.zeros((64, 64, 3), dtype=np.uint8))


def test_existing_path_that_is_not_a_store_is_never_replaced(tmp_path: Path) -> None:
    folder = tmp_path / "mine.zarr"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="is not a wsiuda tile store"):
            make(folder, overwrite=overwrite)
    assert (folder / "precious.txt").read_text() == "keep me"
    with pytest.raises(OutputError, match="not a wsiuda tile store"):
        TileStore.open(folder)
    assert not is_tile_store(folder)


def test_existing_store_is_replaced_only_with_overwrite(tmp_path: Path) -> None:
    make(tmp_path / "s.zarr").write_tile(0, tiles(1)[0])
    with pytest.raises(OutputError, match="--overwrite"):
        make(tmp_path / "s.zarr")
    fresh = make(tmp_path / "s.zarr", overwrite=True)
    assert not fresh.done().any()


def test_open_missing_store(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="no such tile store"):
        TileStore.open(tmp_path / "absent.zarr")
