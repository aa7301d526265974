"""Slide readers: both backends, plain images, and a one-line error for every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsiuda.errors import SlideError
from wsiuda.geometry import Region
from wsiuda.io import open_slide

DATA = Path(__file__).parent / "data"


def test_synthetic_slide_metadata_through_both_backends(synthetic_slide: Path) -> None:
    for backend in ("openslide", "tiffslide"):
        with open_slide(synthetic_slide, backend=backend) as reader:
            info = reader.info
            assert info.backend == backend
            assert info.vendor == "aperio"
            assert info.mpp == pytest.approx(0.25)
            assert info.objective_power == 40
            assert info.level_shapes == ((2048, 2560), (512, 640), (128, 160))
            assert info.level_downsamples == pytest.approx((1.0, 4.0, 16.0))


@pytest.mark.parametrize("level", [0, 1, 2])
def test_both_backends_read_identical_pixels(synthetic_slide: Path, level: int) -> None:
    # Both decode the JPEG tiles with libjpeg-turbo and this pyramid's downsamples are exact integers, so
    # the pixels agree exactly (OpenSlide would interpolate at fractional level offsets; none here).
    with (
        open_slide(synthetic_slide, backend="openslide") as a,
        open_slide(synthetic_slide, backend="tiffslide") as b,
    ):
        height, width = a.info.level_shapes[level]
        region = Region(height // 3, width // 5, height // 2, width // 2)
        pixels_a = a.read_level(region, level=level)
        pixels_b = b.read_level(region, level=level)
    assert pixels_a.shape == (height // 2, width // 2, 3) and pixels_a.dtype == np.uint8
    np.testing.assert_array_equal(pixels_a, pixels_b)


def test_auto_backend_reads_tiff_slides_with_tiffslide_and_falls_back_to_openslide(
    synthetic_slide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_slide(synthetic_slide) as reader:
        assert reader.info.backend == "tiffslide"

    import wsiuda.io.backends

    def refuse(path: Path) -> None:
        raise SlideError(f"{path}: tiffslide cannot read this slide (test)")

    monkeypatch.setattr(wsiuda.io.backends, "TiffSlideReader", refuse)
    with open_slide(synthetic_slide, backend="auto") as reader:
        assert reader.info.backend == "openslide"
        assert reader.read_level(Region(0, 0, 8, 8), level=0).shape == (8, 8, 3)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_threads_sharing_a_reader_read_what_one_thread_reads(synthetic_slide: Path, backend: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    regions = [Region(int(y), int(x), 300, 300) for y, x in rng.integers(0, 1700, (96, 2))]
    with open_slide(synthetic_slide, backend=backend) as reader:
        alone = [reader.read_level(region, level=0) for region in regions]
    with open_slide(synthetic_slide, backend=backend) as reader:
        reader.limit_tile_cache(0)  # every read decodes: the file handle is busy the whole time
        with ThreadPoolExecutor(4) as threads:
            together = list(threads.map(lambda region: reader.read_level(region, level=0), regions))
    for region, one, other in zip(regions, alone, together, strict=True):
        np.testing.assert_array_equal(one, other, err_msg=str(region))


def test_tile_reads_do_not_depend_on_the_position_of_tifffiles_handle(synthetic_slide: Path) -> None:
    # tifffile seeks and reads its file handle without the handle's lock in places (loading a page, probing
    # a JPEG page for JFIF). A tile read through that handle could start where such a seek left it: with a
    # thread moving it as here, about one read in 200 failed, so with 1500 reads this test would all but
    # never pass.
    import threading

    rng = np.random.default_rng(4)
    regions = [Region(int(y), int(x), 256, 256) for y, x in rng.integers(0, 1700, (1500, 2))]
    with open_slide(synthetic_slide, backend="tiffslide") as reader:
        alone = [reader.read_level(region, level=0) for region in regions]
    with open_slide(synthetic_slide, backend="tiffslide") as reader:
        reader.limit_tile_cache(0)
        handle = reader._slide.ts_tifffile.filehandle  # type: ignore[attr-defined]
        done = threading.Event()

        def move_the_handle() -> None:
            offsets = rng.integers(0, handle.size, 4096)
            while not done.is_set():
                for offset in offsets:
                    handle.seek(int(offset))
                    handle.read(4)

        mover = threading.Thread(target=move_the_handle)
        mover.start()
        try:
            moved = [reader.read_level(region, level=0) for region in regions]
        finally:
            done.set()
            mover.join()
    for region, one, other in zip(regions, alone, moved, strict=True):
        np.testing.assert_array_equal(one, other, err_msg=str(region))


def test_read_region_is_level0_yx_and_white_outside(synthetic_slide: Path) -> None:
    with open_slide(synthetic_slide) as reader:
        inside = reader.read_level(Region(100, 200, 50, 60), level=0)
        # Level-0 coordinates in, (y, x) order: the same pixels through read_region at level 0.
        np.testing.assert_array_equal(reader.read_region(Region(100, 200, 50, 60)), inside)
        # At level 1 (downsample 4) a level-0 region of 400 x 200 gives 100 x 50 pixels.
        assert reader.read_region(Region(0, 0, 400, 200), level=1).shape == (100, 50, 3)
        corner = reader.read_level(Region(-10, -20, 30, 40), level=0)
        assert (corner[:10] == 255).all() and (corner[:, :20] == 255).all()
        outside = reader.read_level(Region(5000, 5000, 8, 8), level=0)
        assert (outside == 255).all()


def test_slide_mpp_overrides_metadata(synthetic_slide: Path) -> None:
    with open_slide(synthetic_slide, slide_mpp=0.2) as reader:
        assert reader.info.mpp == 0.2


def test_plain_png_is_a_one_level_slide_and_alpha_is_dropped(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(40, 50, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    path = tmp_path / "patch.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    with open_slide(path, slide_mpp=0.25) as reader:
        assert reader.info.backend == "plain"
        assert reader.info.level_shapes == ((40, 50),)
        assert reader.info.mpp == 0.25
        np.testing.assert_array_equal(reader.read_level(Region(0, 0, 40, 50), level=0), rgba[..., :3])


def test_non_pyramidal_tiff_is_read_as_plain_image(tmp_path: Path) -> None:
    import tifffile

    image = np.random.default_rng(1).integers(0, 256, size=(30, 20, 3), dtype=np.uint8)
    path = tmp_path / "strip.tif"
    tifffile.imwrite(path, image, photometric="rgb")
    with open_slide(path) as reader:
        assert reader.info.backend == "plain"
        assert reader.info.mpp is None
        np.testing.assert_array_equal(reader.read_level(Region(0, 0, 30, 20), level=0), image)


def test_plain_tiff_resolution_gives_mpp_only_when_plausible(tmp_path: Path) -> None:
    import tifffile

    image = np.zeros((8, 8, 3), dtype=np.uint8)
    microscope, screen = tmp_path / "microscope.tif", tmp_path / "screen.tif"
    tifffile.imwrite(
        microscope, image, photometric="rgb", resolution=(40000, 40000), resolutionunit="CENTIMETER"
    )
    tifffile.imwrite(screen, image, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    assert open_slide(microscope).info.mpp == pytest.approx(0.25)
    assert open_slide(screen).info.mpp is None


def _one_line_error(path: Path, **kwargs: object) -> str:
    with pytest.raises(SlideError) as caught:
        open_slide(path, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    return message


@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
def test_missing_file(tmp_path: Path, backend: str) -> None:
    assert "no such file" in _one_line_error(tmp_path / "absent.svs", backend=backend)


def test_folder_and_empty_file(tmp_path: Path) -> None:
    assert "folder" in _one_line_error(tmp_path)
    empty = tmp_path / "empty.svs"
    empty.touch()
    assert "empty" in _one_line_error(empty)


@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
def test_text_file_named_svs_is_not_a_slide(backend: str) -> None:
    message = _one_line_error(DATA / "not-a-slide.svs", backend=backend)
    assert "slide" in message


@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
def test_truncated_slide_is_refused_before_reading(backend: str) -> None:
    # tests/data/truncated.svs: the first 6000 bytes of a 2-level synthetic SVS.
    assert "truncated" in _one_line_error(DATA / "truncated.svs", backend=backend)


def test_broken_png(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    assert "cannot decode" in _one_line_error(path)


def test_unknown_backend(synthetic_slide: Path) -> None:
    assert "unknown backend" in _one_line_error(synthetic_slide, backend="bioformats")


def test_truncated_tile_data_fails_at_read_with_one_line(tmp_path: Path, synthetic_slide: Path) -> None:
    # Zero the middle of the file: the TIFF structure is intact, so only decoding a tile can notice.
    damaged = tmp_path / "damaged.svs"
    data = bytearray(synthetic_slide.read_bytes())
    data[len(data) // 8 : len(data) // 2] = bytes(len(data) // 2 - len(data) // 8)
    damaged.write_bytes(bytes(data))
    with open_slide(damaged, backend="tiffslide") as reader, pytest.raises(SlideError) as caught:
        reader.read_level(Region(0, 0, 2048, 2560), level=0)
    assert str(damaged) in str(caught.value) and "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------- real slides
@pytest.mark.realdata
def test_cmu1_reads_with_mpp_through_both_backends(shared: Path) -> None:
    from conftest import shared_file

    path = shared_file(shared, "slides/CMU-1-Small-Region.svs")
    with open_slide(path, backend="openslide") as a, open_slide(path, backend="tiffslide") as b:
        assert a.info.mpp == pytest.approx(0.499, abs=1e-3)
        assert a.info.shape == b.info.shape == (2967, 2220)  # (height, width)
        region = Region(1000, 1000, 256, 256)
        diff = np.abs(a.read_level(region, level=0).astype(int) - b.read_level(region, level=0))
        # Aperio JPEG tiles: both decoders are libjpeg-turbo, but OpenSlide decodes through its own
        # colour conversion path; allow a couple of levels, nothing more.
        assert diff.max() <= 2


@pytest.mark.realdata
def test_jpeg2000_svs_without_mpp_opens_and_reports_none(shared: Path) -> None:
    from conftest import shared_file

    path = shared_file(shared, "slides/tcga-cr-7395-01a-01-ts1.svs")
    for backend in ("auto", "openslide", "tiffslide"):
        with open_slide(path, backend=backend) as reader:
            assert reader.info.mpp is None
            assert reader.info.level_count == 2
            pixels = reader.read_level(Region(1500, 2000, 64, 64), level=0)
            assert pixels.shape == (64, 64, 3) and pixels.std() > 0
    assert open_slide(path, slide_mpp=0.5).info.mpp == 0.5


@pytest.mark.realdata
def test_dicom_that_openslide_rejects_gets_a_clear_message(shared: Path) -> None:
    from conftest import shared_file

    path = shared_file(shared, "slides/pathml_small_dicom.dcm")
    assert "DICOM" in _one_line_error(path)
    assert "--backend openslide" in _one_line_error(path, backend="tiffslide")


@pytest.mark.realdata
def test_plain_strip_tiff_is_read_as_image(shared: Path) -> None:
    from conftest import shared_file

    with open_slide(shared_file(shared, "slides/kidney-48-5.tif")) as reader:
        assert reader.info.backend == "plain"
        assert reader.info.shape == (901, 1493)
        assert reader.info.mpp is None


@pytest.mark.realdata
def test_generic_tiff_screen_resolution_is_not_taken_as_mpp(shared: Path) -> None:
    from conftest import shared_file

    with open_slide(shared_file(shared, "slides/fixtures/boxes.tiff")) as reader:
        assert reader.info.mpp is None  # its 72 dpi tags would say 353 µm/px


def test_mask_store_sums_the_stats_of_finished_tiles_only(tmp_path: Path) -> None:
    from wsiuda.io.maskstore import MaskStore

    store = MaskStore.create(tmp_path / "s.mask.zarr", shape=(20, 30), tile=10, mpp=0.25, metadata={})
    for index, nuclei in (((0, 1), 3), ((1, 2), 4)):
        core = Region(index[0] * 10, index[1] * 10, 10, 10)
        store.write_tile(
            index,
            core,
            probability=np.zeros((10, 10), np.float32),
            labels=np.zeros((10, 10), np.uint32),
            features=[],
            stats={"nuclei": nuclei, "crf_s": 0.5},
        )
    (store.path / "done" / "c" / "1" / "0.x1y2.partial").write_bytes(b"")  # a write cut short
    done = store.done_tiles()
    assert done.sum() == 2 and done[0, 1] and done[1, 2]
    np.testing.assert_array_equal(done, np.asarray(store.group["done"][...], dtype=bool))  # as zarr reads it
    stats = store.tile_stats()
    assert stats["nuclei"] == 7 and stats["crf_s"] == 1.0 and stats["read_s"] == 0.0
    assert store.tile_stats(done) == stats
    only_first = np.zeros_like(done)
    only_first[0, 1] = True
    assert store.tile_stats(only_first)["nuclei"] == 3


def test_chunks_written_as_files_read_back_as_zarr_writes_them(tmp_path: Path) -> None:
    # Whole chunks go straight to their files; zarr must read them as the arrays zarr itself writes,
    # edge chunks (filled past the array's edge) and strings included.
    import zarr

    from wsiuda.io.chunks import ChunkFiles

    rng = np.random.default_rng(0)
    arrays = {
        "labels": (np.dtype("uint32"), (23, 37), (10, 16)),
        "probability": (np.dtype("uint8"), (23, 37), (10, 16)),
        "stats": (np.dtype("float64"), (3, 3, 4), (1, 1, 4)),
    }
    stores = {how: zarr.open_group(str(tmp_path / f"{how}.zarr"), mode="w") for how in ("files", "zarr")}
    for name, (dtype, shape, chunks) in arrays.items():
        values = rng.integers(0, 200, size=shape).astype(dtype)
        for how, group in stores.items():
            array = group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
            writer = ChunkFiles(array, tmp_path / f"{how}.zarr")
            for chunk in np.ndindex(*array.cdata_shape):
                region = tuple(
                    slice(i * size, min((i + 1) * size, extent))
                    for i, size, extent in zip(chunk, chunks, shape, strict=True)
                )
                if how == "files":
                    writer.write(chunk, values[region])
                else:
                    array[region] = values[region]
        for how in stores:
            reopened = zarr.open_group(str(tmp_path / f"{how}.zarr"), mode="r")
            np.testing.assert_array_equal(np.asarray(reopened[name][...]), values, err_msg=f"{name} {how}")
            files = ChunkFiles(reopened[name], tmp_path / f"{how}.zarr")  # read back either way
            last = tuple(count - 1 for count in reopened[name].cdata_shape)
            edge = tuple(slice(i * size, None) for i, size in zip(last, chunks, strict=True))
            np.testing.assert_array_equal(files.read(last), values[edge])
    texts = stores["files"].create_array("texts", shape=(2, 2), chunks=(1, 1), dtype=str)
    text_files = ChunkFiles(texts, tmp_path / "files.zarr")
    text_files.write((1, 0), np.array([["µm\nline two\n"]], dtype=object))
    assert str(zarr.open_group(str(tmp_path / "files.zarr"), mode="r")["texts"][1, 0]) == "µm\nline two\n"
    assert text_files.read((1, 0))[0, 0] == "µm\nline two\n"
    assert text_files.read((0, 1))[0, 0] == ""  # never written: the fill value
    assert not list(tmp_path.rglob("*.partial"))


@pytest.mark.parametrize("key_encoding", [None, {"name": "v2", "separator": "."}])
def test_stored_chunks_are_those_written(tmp_path: Path, key_encoding: dict[str, str] | None) -> None:
    import zarr

    from wsiuda.io.chunks import ChunkFiles

    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    options = {"chunk_key_encoding": key_encoding} if key_encoding else {}
    array = group.create_array("a", shape=(5, 25, 3), chunks=(2, 2, 3), dtype="uint8", **options)
    files = ChunkFiles(array, tmp_path / "s.zarr")
    assert files.stored_chunks() == []
    written = [(2, 12, 0), (0, 10, 0), (0, 3, 0)]  # 10 after 3: sorted as numbers, not as names
    for chunk in written:
        array[chunk[0] * 2 : chunk[0] * 2 + 2, chunk[1] * 2 : chunk[1] * 2 + 2, :] = 1
    assert files.stored_chunks() == sorted(written)


def test_chunks_of_other_codecs_are_written_through_zarr(tmp_path: Path) -> None:
    import zarr
    from zarr.codecs import BloscCodec

    from wsiuda.io.chunks import ChunkFiles

    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    array = group.create_array(
        "a", shape=(8, 8), chunks=(4, 4), dtype="uint16", compressors=[BloscCodec(cname="lz4")]
    )
    writer = ChunkFiles(array, tmp_path / "s.zarr")
    writer.write((1, 1), np.full((4, 4), 7, np.uint16))
    assert int(zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["a"][5, 6]) == 7
    np.testing.assert_array_equal(writer.read((1, 1)), np.full((4, 4), 7, np.uint16))
    with pytest.raises(ValueError, match="chunk"):
        writer.write((0, 0), np.zeros((3, 4), np.uint16))


def test_probability_to_uint8_rounds_and_saturates_as_numpy_does() -> None:
    from wsiuda.io.maskstore import to_uint8

    rng = np.random.default_rng(3)
    probability = np.concatenate(
        [rng.random(10_000), np.arange(256) / 255.0, (np.arange(255) + 0.5) / 255.0, [-0.3, -1e-6, 1.2, 7.0]]
    ).astype(np.float32)[None, :]
    expected = np.clip(np.rint(probability * np.float32(255.0)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(to_uint8(probability), expected)
