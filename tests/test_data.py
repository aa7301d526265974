"""Labelled folders, group ids and splits, target sources and patch sampling."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file
from PIL import Image

from wsiuda.data import (
    ImagePool,
    SlidePool,
    StorePool,
    channel_stats,
    group_id,
    open_target,
    read_labelled_folder,
    sample_labelled,
    split_by_group,
)
from wsiuda.errors import DataError
from wsiuda.geometry import Region


def write_pair(root: Path, name: str, *, size: int = 32, seed: int = 0, rgba: bool = False) -> None:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    image = rng.integers(0, 256, (size, size, 4 if rgba else 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "images" / f"{name}.png")
    Image.fromarray(((image[..., 0] > 128) * 255).astype(np.uint8)).save(root / "masks" / f"{name}.png")


def test_group_ids_follow_slides_and_patients() -> None:
    assert group_id("03_5") == "slide-03"
    assert group_id("TCGA-21-5784-01Z-00-DX1") == "TCGA-21-5784"
    assert group_id("tcga-ab-1234-01a") == "TCGA-AB-1234"
    assert group_id("patch_a") == "patch_a"


def test_images_and_masks_layout_with_rgba_instances_and_resampling(tmp_path: Path) -> None:
    write_pair(tmp_path, "01_1", rgba=True)
    write_pair(tmp_path, "01_2", seed=1)
    instance = np.zeros((32, 32), dtype=np.uint16)
    instance[2:6, 2:6], instance[10:20, 10:20] = 1, 7  # instance ids become foreground
    Image.fromarray(instance).save(tmp_path / "masks" / "01_2.png")  # 16-bit PNG
    (tmp_path / "images" / "notes.txt").write_text("not an image, skipped")
    dataset = read_labelled_folder(tmp_path, image_mpp=0.25, mpp=0.25)
    assert [item.name for item in dataset.images] == ["01_1", "01_2"]
    first, second = dataset.images
    assert first.image.shape == (32, 32, 3) and first.image.dtype == np.uint8
    assert second.mask.dtype == bool and second.mask.sum() == 16 + 100
    assert {item.group for item in dataset.images} == {"slide-01"}
    half = read_labelled_folder(tmp_path, image_mpp=0.25, mpp=0.5)
    assert half.images[0].image.shape == (16, 16, 3) and half.images[1].mask.shape == (16, 16)


def test_tnbc_layout(tmp_path: Path) -> None:
    for folder in ("Slide_01", "GT_01", "Slide_02", "GT_02"):
        (tmp_path / folder).mkdir()
    for slide in ("01", "02"):
        image = np.full((16, 16, 3), 200, dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / f"Slide_{slide}" / f"{slide}_1.png")
        Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / f"GT_{slide}" / f"{slide}_1.png")
    dataset = read_labelled_folder(tmp_path, image_mpp=0.25, mpp=0.25)
    assert dataset.groups == ["slide-01", "slide-02"]


def test_bad_folders_give_errors_that_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="neither images"):
        read_labelled_folder(tmp_path, image_mpp=0.25, mpp=0.25)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="no images found"):
        read_labelled_folder(tmp_path, image_mpp=0.25, mpp=0.25)
    write_pair(tmp_path, "a")
    Image.fromarray(np.zeros((20, 32), dtype=np.uint8)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(DataError, match=r"a\.png is 32x32 but its mask .*a\.png is 32x20"):
        read_labelled_folder(tmp_path, image_mpp=0.25, mpp=0.25)
    write_pair(tmp_path, "a")
    (tmp_path / "masks" / "a.png").unlink()
    with pytest.raises(DataError, match=r"images/a\.png: no mask"):
        read_labelled_folder(tmp_path, image_mpp=0.25, mpp=0.25)
    write_pair(tmp_path, "a")
    (tmp_path / "images" / "b.png").write_text("this is not a PNG")
    (tmp_path / "masks" / "b.png").write_text("nor this")
    with pytest.raises(DataError, match=r"b\.png"):
        read_labelled_folder(tmp_path, image_mpp=0.25, mpp=0.25)


def test_split_table_holds_out_test_and_marks_validation(tmp_path: Path) -> None:
    for i, name in enumerate(["TCGA-AA-0001-01", "TCGA-AA-0002-01", "TCGA-AA-0003-01", "TCGA-AA-0004-01"]):
        write_pair(tmp_path, name, seed=i)
    (tmp_path / "split.tsv").write_text(
        "TCGA-AA-0001-01\tTrain_Folder\nTCGA-AA-0002-01\tVal_Folder\nTCGA-AA-0003-01\tTest_Folder\n"
    )
    dataset = read_labelled_folder(tmp_path, image_mpp=0.25, mpp=0.25)
    assert "TCGA-AA-0003-01" not in [item.name for item in dataset.images]
    train, val = split_by_group(dataset, val_fraction=0.5, rng=np.random.default_rng(0))
    assert [item.name for item in val.images] == ["TCGA-AA-0002-01"]
    assert len(train.images) == 2
    pool = open_target(tmp_path, image_mpp=0.25, mpp=0.25, size=16)
    assert isinstance(pool, ImagePool) and len(pool) == 3  # the test image is left out of the target too


def test_random_group_split_never_splits_a_slide(tmp_path: Path) -> None:
    for slide in range(1, 6):
        for crop in range(1, 4):
            write_pair(tmp_path, f"{slide:02d}_{crop}", size=16, seed=slide * 10 + crop)
    dataset = read_labelled_folder(tmp_path, image_mpp=0.25, mpp=0.25)
    for seed in range(5):
        train, val = split_by_group(dataset, val_fraction=0.2, rng=np.random.default_rng(seed))
        assert len(val.groups) == 1 and len(val.images) == 3
        assert not set(train.groups) & set(val.groups)


def test_patch_sampling_pads_small_images_and_balances_sources(tmp_path: Path) -> None:
    write_pair(tmp_path / "a", "x", size=20)
    write_pair(tmp_path / "b", "y", size=64, seed=3)
    sets = [read_labelled_folder(tmp_path / name, image_mpp=0.25, mpp=0.25) for name in ("a", "b")]
    images, masks = sample_labelled(np.random.default_rng(0), sets, count=40, size=32)
    assert images.shape == (40, 32, 32, 3) and masks.shape == (40, 32, 32)
    assert set(np.unique(masks).tolist()) <= {0, 1}
    again, _ = sample_labelled(np.random.default_rng(0), sets, count=40, size=32)
    np.testing.assert_array_equal(images, again)
    mean, std = channel_stats(sets)
    assert len(mean) == 3 and all(0 < s < 1 for s in std)


def test_target_sources_images_slides_and_errors(tmp_path: Path, synthetic_slide: Path) -> None:
    with pytest.raises(DataError, match="no such"):
        open_target(tmp_path / "missing", image_mpp=0.25, mpp=0.25, size=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images or slides"):
        open_target(tmp_path / "empty", image_mpp=0.25, mpp=0.25, size=16)
    pool = open_target(synthetic_slide, image_mpp=0.25, mpp=0.25, size=128)
    assert isinstance(pool, SlidePool) and len(pool) > 0
    patches = pool.sample(np.random.default_rng(0), count=3, size=128)
    assert patches.shape == (3, 128, 128, 3)
    assert patches.mean() < 235, "tissue tiles should not be glass"
    pool.close()


def write_slide_without_mpp(path: Path) -> Path:
    """A tiled TIFF (so read as a slide, not a plain image) of H&E-like tissue, with no µm/px recorded."""
    import tifffile
    from synthetic import synthetic_he

    tifffile.imwrite(path, synthetic_he((512, 640), seed=3, tissue=0.6), tile=(256, 256), photometric="rgb")
    return path


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def test_a_target_folder_leaves_out_unusable_slides_with_one_warning_each(
    tmp_path: Path, synthetic_slide: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "good.svs").symlink_to(synthetic_slide)
    corrupt = folder / "corrupt.svs"
    corrupt.write_bytes(synthetic_slide.read_bytes()[:20000])
    no_mpp = write_slide_without_mpp(folder / "no-mpp.tif")
    with caplog.at_level(logging.WARNING, logger="wsiuda"):
        pool = open_target(folder, image_mpp=0.25, mpp=0.25, size=128)
    assert isinstance(pool, SlidePool) and {path.name for path, _, _ in pool.tiles} == {"good.svs"}
    pool.close()
    corrupt_warning, no_mpp_warning = sorted(warnings_of(caplog))
    assert str(corrupt) in corrupt_warning and "truncated" in corrupt_warning
    assert str(no_mpp) in no_mpp_warning and "pass --slide-mpp" in no_mpp_warning
    (folder / "good.svs").unlink()
    with pytest.raises(DataError, match=r"slides: none of its 2 target files is usable"):
        open_target(folder, image_mpp=0.25, mpp=0.25, size=128)
    # A slide given by itself is the whole target: it stands or falls with it.
    with pytest.raises(DataError, match=r"corrupt\.svs: .*truncated"):
        open_target(corrupt, image_mpp=0.25, mpp=0.25, size=128)


def test_slide_mpp_supplies_a_target_slides_missing_resolution(tmp_path: Path) -> None:
    slide = write_slide_without_mpp(tmp_path / "no-mpp.tif")
    with pytest.raises(DataError, match=r"no-mpp\.tif has no mpp in its metadata; pass --slide-mpp"):
        open_target(slide, image_mpp=0.25, mpp=0.25, size=64)
    pool = open_target(slide, image_mpp=0.25, mpp=0.25, size=64, slide_mpp=0.5)
    assert isinstance(pool, SlidePool) and {scale for _, scale, _ in pool.tiles} == {2.0}
    assert pool.sample(np.random.default_rng(0), count=2, size=64).shape == (2, 64, 64, 3)
    pool.close()


def test_target_from_tile_stores(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from wsiuda.io.store import TileStore

    def store(name: str, *, finished: bool) -> Path:
        tiles = TileStore.create(
            tmp_path / name, regions=[Region(0, 0, 32, 32), Region(0, 32, 32, 32)], tile=32, halo=8,
            codec="zstd", metadata={"target_mpp": 0.5},
        )  # fmt: skip
        for index in (0, 1) if finished else (0,):
            tiles.write_tile(index, np.full((48, 48, 3), 100, dtype=np.uint8))
        if finished:
            tiles.mark_complete()
        return tiles.path

    # An interrupted `wsiuda tile` would have the run train on part of its slide: refused, as by segment.
    interrupted = store("interrupted.zarr", finished=False)
    incomplete = r"interrupted\.zarr: the tile store is incomplete; finish it with `wsiuda tile` first"
    for target in (interrupted, tmp_path):
        with pytest.raises(DataError, match=incomplete):
            open_target(target, image_mpp=0.25, mpp=0.25, size=64)
    store("finished.zarr", finished=True)
    with caplog.at_level(logging.WARNING, logger="wsiuda"):
        pool = open_target(tmp_path, image_mpp=0.25, mpp=0.25, size=64)
    assert isinstance(pool, StorePool) and len(pool) == 2  # the finished store's tiles only
    (warning,) = warnings_of(caplog)
    assert "left out of the target" in warning and str(interrupted) in warning
    patches = pool.sample(np.random.default_rng(0), count=2, size=64)  # 48 px at 0.5 -> 96 px at 0.25
    assert patches.shape == (2, 64, 64, 3) and (patches == 100).all()


@pytest.mark.realdata
def test_real_tnbc_and_monuseg_folders(shared: Path) -> None:
    tnbc = read_labelled_folder(shared_file(shared, "datasets/tnbc"), image_mpp=0.25, mpp=0.25)
    assert len(tnbc.images) == 50 and len(tnbc.groups) == 11
    assert all(item.image.shape == (512, 512, 3) for item in tnbc.images)
    assert tnbc.license == "CC BY 4.0"
    monuseg = read_labelled_folder(shared_file(shared, "datasets/monuseg2018"), image_mpp=0.25, mpp=0.25)
    assert len(monuseg.images) == 30  # the 14 official test images are held out
    assert all(item.group.startswith("TCGA-") for item in monuseg.images)
    assert not any("test" in (item.split or "").lower() for item in monuseg.images)
    train, val = split_by_group(monuseg, val_fraction=0.15, rng=np.random.default_rng(0))
    assert len(val.images) == 6 and not set(train.groups) & set(val.groups)
    train, val = split_by_group(tnbc, val_fraction=0.15, rng=np.random.default_rng(0))
    assert len(val.groups) == 2 and not set(train.groups) & set(val.groups)
