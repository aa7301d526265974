"""The segment pipeline on synthetic slides: ownership at tile borders, level-0 coordinates, tiled equals
whole, the outputs QuPath and napari read, tile-store input, and resuming after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from shapely import unary_union
from shapely.geometry import box, shape

from wsiuda.io.geojson import load_features
from wsiuda.pipelines.segment import NetworkInfo, SegmentConfig, segment

TESTS = Path(__file__).resolve().parent
PINK = (236, 176, 208)
PURPLE = (84, 52, 132)


# ------------------------------------------------------------------------------------------------ helpers
@dataclass(frozen=True)
class DarkPredictor:
    """A stand-in network: dark pixels (nuclei) → 1, light ones (eosin, glass) → 0. Picklable."""

    delay_s: float = 0.0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.delay_s:
            time.sleep(self.delay_s)
        grey = images.astype(np.float32).mean(axis=-1)
        return np.clip((150.0 - grey) / 40.0 + 0.5, 0.0, 1.0).astype(np.float32)


class FailingPredictor:
    """A stand-in network that must not be called: where every tile is already done."""

    def __call__(self, images: np.ndarray) -> np.ndarray:
        raise AssertionError("a tile was run again")


DARK_NETWORK = NetworkInfo(mpp=0.25, receptive_field_px=1, align=1, identity="dark")


def dark_unet(depth: int = 2, width: int = 4):  # type: ignore[no-untyped-def]
    """A real U-Net whose weights make it a darkness detector (nuclei → 1), to save as a model file."""
    import torch

    from wsiuda.models import ModelMeta, build_unet

    network = build_unet(width=width, depth=depth)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.zero_()
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1.0)  # identity in eval mode (running mean 0, variance 1)
        first = network.down[0]
        first[0].weight[0, :, 1, 1] = -1.0 / 3.0  # minus the mean normalised intensity
        first[1].bias[0] = 0.3  # dark pixels end above 0, pink and glass below
        first[3].weight[0, 0, 1, 1] = 1.0
        last = network.up_conv[-1]
        last[0].weight[0, width, 1, 1] = 1.0  # channel 0 of the full-resolution skip
        last[3].weight[0, 0, 1, 1] = 1.0
        network.head.weight[0, 0, 0, 0] = 20.0
        network.head.bias[0] = -20.0 * 0.45
    return network, ModelMeta(arch_kwargs={"width": width, "depth": depth}, mpp=0.25)


def save_dark_model(path: Path) -> Path:
    """The darkness U-Net as a model file, as `wsiuda adapt` would save a model."""
    from wsiuda.models import save_model

    network, meta = dark_unet()
    save_model(path, network, meta)
    return path


def disk_image(shape: tuple[int, int], disks: list[tuple[int, int, int]]) -> np.ndarray:
    """Purple disks (cy, cx, r) on pink, drawn without anti-aliasing."""
    image = np.empty((*shape, 3), np.uint8)
    image[:] = PINK
    for cy, cx, r in disks:
        cv2.circle(image, (cx, cy), r, PURPLE, thickness=-1)
    return image


def write_slide(path: Path, image: np.ndarray, *, mpp: float, app_mag: int) -> Path:
    from synthetic import write_pyramidal_tiff

    return write_pyramidal_tiff(path, image, mpp=mpp, app_mag=app_mag, tile=128, levels=2, jpeg=False)


def sync_config(inputs: list[Path], output: Path, **kwargs: object) -> SegmentConfig:
    settings: dict[str, object] = {"crf": False, "min_tissue": 0.0, "tile": 64, "scheduler": "sync"}
    settings.update(kwargs)
    return SegmentConfig(inputs=tuple(str(p) for p in inputs), output=str(output), **settings)  # type: ignore[arg-type]


def drawn_disk(cy: int, cx: int, r: int):  # type: ignore[no-untyped-def]
    """The pixels cv2.circle paints for a disk, as a polygon of pixel squares (level-0 px)."""
    mask = np.zeros((cy + r + 2, cx + r + 2), np.uint8)
    cv2.circle(mask, (cx, cy), r, 1, thickness=-1)
    return unary_union([box(x, y, x + 1, y + 1) for y, x in zip(*np.nonzero(mask), strict=True)])


def iou(a, b) -> float:  # type: ignore[no-untyped-def]
    return float(a.intersection(b).area / a.union(b).area)


# -------------------------------------------------------------------------------------- border ownership
# Disks on tile borders (multiples of 64), on corners, and inside tiles; none touch each other.
BORDER_DISKS = [
    (64, 64, 12),  # a corner of four tiles
    (64, 140, 10),  # a horizontal border
    (150, 128, 11),  # a vertical border
    (192, 192, 13),  # another corner
    (30, 30, 9),  # inside a tile
    (256, 60, 12),  # a border
    (250, 300, 10),  # inside
    (320, 256, 12),  # a border, near the last row
    (128, 320, 9),  # a corner
    (300, 140, 11),  # inside
]


@pytest.mark.parametrize("crf", [False, True])
def test_each_disk_across_tile_borders_and_corners_is_one_polygon(tmp_path: Path, crf: bool) -> None:
    slide = write_slide(tmp_path / "disks.svs", disk_image((360, 380), BORDER_DISKS), mpp=0.25, app_mag=40)
    report = segment(
        sync_config([slide], tmp_path / "out.geojson", crf=crf),
        predictor=DarkPredictor(),
        network=DARK_NETWORK,
    )
    assert not report.failures
    polygons = [shape(f["geometry"]) for f in load_features(tmp_path / "out.geojson")]
    assert len(polygons) == len(BORDER_DISKS)
    for cy, cx, r in BORDER_DISKS:
        truth = drawn_disk(cy, cx, r)
        matches = [p for p in polygons if iou(p, truth) > 0.9]
        assert len(matches) == 1, (cy, cx, r, [round(iou(p, truth), 3) for p in polygons])


def test_halo_too_small_for_the_nuclei_loses_or_cuts_them(tmp_path: Path) -> None:
    """The same slide with a halo that ignores nucleus size: the border check above would catch it."""
    slide = write_slide(tmp_path / "disks.svs", disk_image((360, 380), BORDER_DISKS), mpp=0.25, app_mag=40)
    config = sync_config([slide], tmp_path / "out.geojson", max_nucleus_diameter_um=0.25)
    segment(config, predictor=DarkPredictor(), network=DARK_NETWORK)
    polygons = [shape(f["geometry"]) for f in load_features(tmp_path / "out.geojson")]
    whole = [any(iou(p, drawn_disk(cy, cx, r)) > 0.9 for p in polygons) for cy, cx, r in BORDER_DISKS]
    assert not all(whole)


# Two overlapping disks, across the vertical border at x = 225 and near the horizontal one at y = 150 of
# 75 px tiles, that the split parts: besides them, the border disks.
SPLIT_PAIR = [(140, 214, 12), (146, 236, 12)]


@pytest.mark.parametrize("nuclei_mpp", [0.25, 0.5])
def test_tiled_labels_equal_the_whole_image_labelled_on_the_nuclei_grid(
    tmp_path: Path, nuclei_mpp: float
) -> None:
    """Tile 75 puts half the windows at odd working pixels: every block still labels on the slide-wide
    nuclei grid, so the stored labels are those of the whole image labelled at once, nucleus for nucleus."""
    import dask.array as da

    from wsiuda.instances import block_mean, label_nuclei

    image = disk_image((360, 380), BORDER_DISKS + SPLIT_PAIR)
    slide = write_slide(tmp_path / "disks.svs", image, mpp=0.25, app_mag=40)
    config = sync_config([slide], tmp_path / "out.geojson", tile=75, nuclei_mpp=nuclei_mpp)
    assert not segment(config, predictor=DarkPredictor(), network=DARK_NETWORK).failures
    stored = da.from_zarr(str(tmp_path / "out.mask.zarr"), component="labels/nuclei/0").compute()

    factor = round(nuclei_mpp / 0.25)
    whole = label_nuclei(
        block_mean(DarkPredictor()(image[None])[0], factor),
        min_area_px=round(config.min_nucleus_area_um2 / nuclei_mpp**2),
        split_depth_px=config.split_depth_um / nuclei_mpp,
    )
    whole = whole.repeat(factor, axis=0).repeat(factor, axis=1)
    assert whole.max() == len(BORDER_DISKS) + len(SPLIT_PAIR)
    pairs = np.unique(np.stack([stored.ravel().astype(np.int64), whole.ravel()]), axis=1)
    # One stored id per nucleus of the whole image and back: the same partition of the pixels.
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1] == whole.max() + 1
    assert len(load_features(tmp_path / "out.geojson")) == whole.max()
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["working"]["nuclei_mpp"] == pytest.approx(nuclei_mpp)


def test_work_boxes_lie_on_the_slide_wide_nuclei_and_crf_grids() -> None:
    from wsiuda.blocks import grid_cores, plan_blocks
    from wsiuda.crf import DEFAULT_CRF, crf_reach_px
    from wsiuda.geometry import Region
    from wsiuda.pipelines.segment.tasks import SlideJob, alignment_px

    reach, crf_reach = 43, crf_reach_px(DEFAULT_CRF)
    halo = 100 + crf_reach + reach + alignment_px(2, DEFAULT_CRF)
    blocks = plan_blocks(grid_cores((700, 900), tile=137), tile=137, halo=halo, align=16)
    job = SlideJob(
        **dict.fromkeys(("source", "key", "store"), ""),  # type: ignore[arg-type]
        scale=1.0,
        level0_mpp=0.25,
        working_mpp=0.25,
        shape=(700, 900),
        level0_shape=(700, 900),
        crf=DEFAULT_CRF,
        threshold=0.5,
        nuclei_factor=2,
        min_area_px=24,
        split_depth_px=1.0,
        nucleus_reach_px=reach,
        crf_reach_px=crf_reach,
    )
    assert len(blocks) == 6 * 7
    for block in blocks:
        nuclei, crf = job.work_boxes(block)
        assert crf.contains(nuclei) and nuclei.contains(block.core_in_window.grow(reach + 1))
        # In the slide's frame: the nuclei box on multiples of 2, the CRF box on multiples of 10 (2 CRF
        # px at 2.5 working px each, and 5 nuclei px), and both inside the window.
        for work_box, step in ((nuclei, 2), (crf, 10)):
            edges = (
                block.window.y + work_box.y,
                block.window.x + work_box.x,
                work_box.height,
                work_box.width,
            )
            assert all(edge % step == 0 for edge in edges), (block.index, work_box)
            assert Region(0, 0, *block.window.shape).contains(work_box)


# ----------------------------------------------------------------------------------------- coordinates
@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_polygons_land_at_level0_positions_of_a_20x_slide(tmp_path: Path, backend: str) -> None:
    """A 20x slide (0.5 µm/px) worked at 0.25 µm/px: polygons come back in the slide's own pixels."""
    disks = [(201, 333, 12), (90, 75, 8), (300, 420, 10)]
    slide = write_slide(tmp_path / "s20x.svs", disk_image((400, 500), disks), mpp=0.5, app_mag=20)
    config = sync_config([slide], tmp_path / "n.geojson", tile=128, backend=backend)
    report = segment(config, predictor=DarkPredictor(), network=DARK_NETWORK)
    assert not report.failures
    polygons = [shape(f["geometry"]) for f in load_features(tmp_path / "n.geojson")]
    assert len(polygons) == len(disks)
    for cy, cx, r in disks:
        truth = drawn_disk(cy, cx, r)
        (match,) = [p for p in polygons if p.intersects(truth)]
        assert iou(match, truth) > 0.9
        assert match.centroid.distance(truth.centroid) < 0.5
    summary = json.loads((tmp_path / "n.summary.json").read_text())
    assert summary["working"]["scale"] == pytest.approx(2.0)
    assert summary["slide"]["shape"] == [400, 500]


def test_a_folder_of_images_gives_one_output_per_image(tmp_path: Path) -> None:
    images = tmp_path / "patches"
    images.mkdir()
    for name, disks in (("a.png", [(40, 40, 10)]), ("b.png", [(30, 30, 9), (90, 90, 11)])):
        cv2.imwrite(str(images / name), cv2.cvtColor(disk_image((128, 128), disks), cv2.COLOR_RGB2BGR))
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    config = sync_config([images], out, slide_mpp=0.25, gzip=True)
    report = segment(config, predictor=DarkPredictor(), network=DARK_NETWORK)
    assert [r.nuclei for r in report.results] == [1, 2]
    assert sorted(p.name for p in out.glob("*.geojson.gz")) == ["a.geojson.gz", "b.geojson.gz"]
    assert (out / "segment.yaml").exists() and (out / "b.summary.json").exists()


# ----------------------------------------------------------------------------------- tiled equals whole
def test_stitched_mask_equals_the_whole_image_prediction(tmp_path: Path) -> None:
    """CRF off, awkward tile (72) and halo (23 + 9 = 32, windows aligned to 4): the store's interior
    probability equals one prediction of the whole image."""
    import dask.array as da
    import torch

    from wsiuda.models import ModelMeta, Segmenter, build_unet

    torch.manual_seed(0)
    torch.set_num_threads(1)
    network = build_unet(width=4, depth=2)
    with torch.no_grad():
        network.head.weight.mul_(30.0)  # spread the untrained network's output over (0, 1)
    segmenter = Segmenter.from_network(network, ModelMeta(arch_kwargs={"width": 4, "depth": 2}, mpp=0.25))
    image = np.random.default_rng(4).integers(0, 255, (200, 236, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "patch.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    info = NetworkInfo(mpp=0.25, receptive_field_px=segmenter.meta.receptive_field_px, align=4)
    config = sync_config(
        [tmp_path / "patch.png"],
        tmp_path / "p.geojson",
        tile=72,
        slide_mpp=0.25,
        max_nucleus_diameter_um=2.25,
    )
    assert not segment(config, predictor=segmenter.predict, network=info).failures
    stored = da.from_zarr(str(tmp_path / "p.mask.zarr"), component="probability").compute()
    whole = segmenter.predict(image[None])[0]
    context = -(-segmenter.meta.receptive_field_px // 2)
    inner = (slice(context, -context), slice(context, -context))
    assert whole[inner].std() > 0.03
    assert np.abs(stored[inner] / 255.0 - whole[inner]).max() <= 0.5 / 255 + 1e-4


# --------------------------------------------------------------------------------------------- outputs
def test_outputs_are_what_qupath_napari_and_users_read(tmp_path: Path) -> None:
    import dask.array as da
    import zarr
    from synthetic import synthetic_he
    from test_geojson import check_qupath_detection

    slide = tmp_path / "synthetic-20x.svs"
    write_slide(slide, synthetic_he((384, 512), seed=11, tissue=0.6), mpp=0.5, app_mag=20)
    out = tmp_path / "run"
    config = sync_config([slide], out, tile=256, crf=True, gzip=True, min_tissue=0.05)
    report = segment(config, predictor=DarkPredictor(), network=DARK_NETWORK)
    (result,) = report.results
    assert result.error is None and result.nuclei > 50
    stem = "synthetic-20x"
    features = load_features(out / f"{stem}.geojson.gz")
    assert len(features) == result.nuclei
    for item in features:
        check_qupath_detection(item)
        assert set(item["properties"]["measurements"]) >= {
            "Area µm^2",
            "Perimeter µm",
            "Mean probability",
            "Circularity",
            "Solidity",
        }
    assert len({item["id"] for item in features}) == len(features)
    # Coordinates are level-0 pixels of the 384 x 512 slide.
    xs = [x for item in features for x, _ in item["geometry"]["coordinates"][0]]
    ys = [y for item in features for _, y in item["geometry"]["coordinates"][0]]
    assert min(xs) >= 0 and max(xs) <= 512 and min(ys) >= 0 and max(ys) <= 384

    store = zarr.open_group(str(out / f"{stem}.mask.zarr"), mode="r")
    assert store.attrs["wsiuda"]["complete"] is True
    assert store.attrs["ome"]["multiscales"][0]["datasets"][0]["path"] == "probability"
    assert store["labels"].attrs["ome"]["labels"] == ["nuclei"]
    labels = da.from_zarr(str(out / f"{stem}.mask.zarr"), component="labels/nuclei/0")
    assert labels.shape == (768, 1024)  # the working grid: 2x the slide
    assert int((labels.compute() > 0).sum()) > 0

    overlay = cv2.imread(str(out / f"{stem}.overlay.png"))
    assert overlay is not None and overlay.shape[:2] == (384, 512)
    assert (overlay == (0, 255, 0)).all(axis=-1).any()  # outlines drawn

    summary = json.loads((out / f"{stem}.summary.json").read_text())
    assert summary["nuclei"] == result.nuclei
    assert summary["tiles"]["planned"] == summary["tiles"]["run_now"] > 0
    assert 0 < summary["domain_shift"]["mean_entropy_bits"] < 1
    assert set(summary["timings_s"]) >= {"read", "predict", "crf", "instances", "polygons", "wall_this_run"}
    assert summary["slide"]["mpp"] == pytest.approx(0.5)
    saved = (out / "segment.yaml").read_text()
    assert "command: segment" in saved and "crf_params" in saved


def test_the_work_after_the_crf_gives_the_same_outputs_in_its_helper_as_in_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local worker that runs two tasks at once hands each tile to a CRF helper process, which goes on
    with the nuclei and the store write; run in this process (sync), every step runs here."""
    import dask.array as da
    from synthetic import synthetic_he

    from wsiuda.pipelines import crf_helper
    from wsiuda.pipelines.segment.cluster import crf_helpers_per_worker

    in_helper: dict[str, list[bool]] = {"helpers": [], "here": []}
    running = ["helpers"]
    real_result = crf_helper.PendingCrf.result

    def recording_result(self: crf_helper.PendingCrf) -> object:
        in_helper[running[0]].append(self._future is not None)  # handed to a helper process
        return real_result(self)

    monkeypatch.setattr(crf_helper.PendingCrf, "result", recording_result)

    slide = write_slide(
        tmp_path / "s.svs", synthetic_he((384, 512), seed=11, tissue=0.6), mpp=0.25, app_mag=40
    )
    runs = {
        "helpers": sync_config(
            [slide], tmp_path / "helpers" / "n.geojson", crf=True, scheduler=None, workers=1
        ),
        "here": sync_config([slide], tmp_path / "here" / "n.geojson", crf=True),
    }
    if not crf_helpers_per_worker(runs["helpers"]):
        pytest.skip("one core: a local worker runs one task at a time, without CRF helpers")
    for name, config in runs.items():
        running[0] = name
        assert not segment(config, predictor=DarkPredictor(), network=DARK_NETWORK).failures
    assert in_helper["helpers"] and all(in_helper["helpers"]), "a tile's CRF ran outside the helpers"
    assert not crf_helper._DISABLED, "a helper died and the CRF fell back to the worker"
    assert in_helper["here"] and not any(in_helper["here"])
    helpers, here = (tmp_path / name for name in runs)
    assert (helpers / "n.geojson").read_bytes() == (here / "n.geojson").read_bytes()
    assert len(load_features(here / "n.geojson")) > 20
    for array in ("labels/nuclei/0", "probability"):
        np.testing.assert_array_equal(
            da.from_zarr(str(helpers / "n.mask.zarr"), component=array).compute(),
            da.from_zarr(str(here / "n.mask.zarr"), component=array).compute(),
        )


def test_tasks_share_a_reader_per_slide_until_the_file_changes(tmp_path: Path) -> None:
    import os

    from wsiuda.geometry import Region
    from wsiuda.pipelines.segment.sources import SourceSpec, close_shared_readers, shared_reader

    slide = write_slide(tmp_path / "s.svs", disk_image((128, 128), [(40, 40, 10)]), mpp=0.25, app_mag=40)
    source = SourceSpec(str(slide), "slide")
    try:
        first = shared_reader(source, 1.0)
        assert shared_reader(source, 1.0) is first and shared_reader(source, 2.0) is not first
        window = Region(20, 20, 40, 40)
        np.testing.assert_array_equal(
            first.read(window), disk_image((128, 128), [(40, 40, 10)])[20:60, 20:60]
        )
        write_slide(slide, disk_image((128, 128), [(90, 90, 10)]), mpp=0.25, app_mag=40)
        os.utime(slide, ns=(1, 1))  # a new modification time, however coarse the file system's clock
        again = shared_reader(source, 1.0)
        assert again is not first
        np.testing.assert_array_equal(again.read(window), np.full((40, 40, 3), PINK, np.uint8))
    finally:
        close_shared_readers()


def test_a_tile_store_segments_like_its_slide(tmp_path: Path) -> None:
    """Lossless tiles from `wsiuda tile` give the nuclei of the slide they came from.

    Not byte for byte: where a window reaches past the stored tiles (beside tissue-free tiles) the store
    has white and the slide has its real pixels.
    """
    from click.testing import CliRunner
    from synthetic import synthetic_he

    from wsiuda.cli.main import cli

    slide = write_slide(
        tmp_path / "s20x.svs", synthetic_he((384, 512), seed=11, tissue=0.6), mpp=0.5, app_mag=20
    )
    tiled = CliRunner().invoke(
        cli,
        [
            *("tile", str(slide), "-o", str(tmp_path / "tiles"), "--mpp", "0.25"),
            *("--tile", "256", "--halo", "16", "--codec", "zstd", "--workers", "1", "--min-tissue", "0.05"),
        ],
    )
    assert tiled.exit_code == 0, tiled.output
    (store,) = (tmp_path / "tiles").glob("*.zarr")
    kwargs = {"tile": 256, "min_tissue": 0.05}
    segment(
        sync_config([store], tmp_path / "a.geojson", **kwargs),
        predictor=DarkPredictor(),
        network=DARK_NETWORK,
    )
    segment(
        sync_config([slide], tmp_path / "b.geojson", **kwargs),
        predictor=DarkPredictor(),
        network=DARK_NETWORK,
    )
    a, b = load_features(tmp_path / "a.geojson"), load_features(tmp_path / "b.geojson")
    assert len(a) == len(b) > 30
    overlaps = [iou(shape(x["geometry"]), shape(y["geometry"])) for x, y in zip(a, b, strict=True)]
    assert min(overlaps) > 0.95
    assert sum(x == y for x, y in zip(a, b, strict=True)) >= 0.95 * len(a)


@pytest.fixture(scope="module")
def tile_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished store of `wsiuda tile` (JPEG tiles), to copy and damage."""
    from click.testing import CliRunner
    from synthetic import synthetic_he

    from wsiuda.cli.main import cli

    root = tmp_path_factory.mktemp("store")
    slide = write_slide(root / "s.svs", synthetic_he((256, 256), seed=3, tissue=0.6), mpp=0.25, app_mag=40)
    args = ["tile", str(slide), "-o", str(root / "tiles"), "--tile", "128", "--workers", "1"]
    tiled = CliRunner().invoke(cli, args)
    assert tiled.exit_code == 0, tiled.output
    return root / "tiles" / "s.zarr"


@pytest.mark.parametrize(
    ("damaged_file", "content", "said"),
    [
        ("zarr.json", "{ not json", "not a wsiuda tile store"),
        ("zarr.json", "[1, 2]", "not a wsiuda tile store"),
        ("tiles/zarr.json", "{", "the store's metadata is damaged"),
        ("tissue/zarr.json", "{", "its tissue mask is damaged"),
        ("tiles/c.0.0.0.0", "junk", "tile 0 is damaged"),
    ],
)
def test_a_damaged_tile_store_fails_with_its_fix_and_the_batch_goes_on(
    tmp_path: Path, tile_store: Path, damaged_file: str, content: str, said: str
) -> None:
    import shutil

    from synthetic import synthetic_he

    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(tile_store, damaged)
    (damaged / damaged_file).write_text(content)
    slide = write_slide(
        tmp_path / "s.svs", synthetic_he((256, 256), seed=3, tissue=0.6), mpp=0.25, app_mag=40
    )
    report = segment(
        sync_config([damaged, slide], tmp_path / "out", tile=128),
        predictor=DarkPredictor(),
        network=DARK_NETWORK,
    )
    failed, done = report.results
    assert failed.error is not None and said in failed.error, failed.error
    assert "\n" not in failed.error and "wsiuda tile --overwrite" in failed.error
    assert done.error is None and (tmp_path / "out" / "s.geojson").is_file()


# ---------------------------------------------------------------------------------------------- resume
RESUME_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_segment import DARK_NETWORK, DarkPredictor, sync_config
from wsiuda.pipelines.segment import segment
segment(sync_config([Path({slide!r})], Path({out!r}), tile=64), predictor=DarkPredictor(delay_s=0.15),
        network=DARK_NETWORK)
"""


def done_tiles(store: Path) -> int:
    from wsiuda.io.maskstore import MaskStore

    if not MaskStore.exists(store):
        return 0
    try:
        return int(MaskStore.open(store, mode="r").done_tiles().sum())
    except Exception:  # the store is being created
        return 0


def test_a_run_killed_midway_resumes_to_the_same_geojson(tmp_path: Path) -> None:
    from synthetic import synthetic_he

    slide = write_slide(tmp_path / "s.svs", synthetic_he((384, 448), seed=3), mpp=0.25, app_mag=40)
    killed = tmp_path / "killed" / "n.geojson"
    script = RESUME_SCRIPT.format(tests=str(TESTS), slide=str(slide), out=str(killed))
    # From another folder: in the repository, ./wsiuda would shadow the installed package.
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, cwd=tmp_path)
    store = tmp_path / "killed" / "n.mask.zarr"
    deadline = time.monotonic() + 120
    while done_tiles(store) < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    finished = done_tiles(store)
    assert 4 <= finished < 42  # 6 x 7 tiles: killed part-way
    assert not killed.exists()

    resumed = segment(sync_config([slide], killed), predictor=DarkPredictor(), network=DARK_NETWORK)
    clean = tmp_path / "clean" / "n.geojson"
    segment(sync_config([slide], clean), predictor=DarkPredictor(), network=DARK_NETWORK)
    assert resumed.results[0].nuclei > 20
    assert killed.read_bytes() == clean.read_bytes()
    summary = json.loads((tmp_path / "killed" / "n.summary.json").read_text())
    assert summary["tiles"]["resumed"] == finished

    # Finished: a rerun skips it; --overwrite redoes it (with a different setting now allowed).
    again = segment(sync_config([slide], killed), predictor=DarkPredictor(), network=DARK_NETWORK)
    assert again.results[0].skipped
    # A GeoJSON cut short since is written again from the store, without running a tile.
    complete = killed.read_bytes()
    killed.write_bytes(complete[:1000])
    repaired = segment(sync_config([slide], killed), predictor=FailingPredictor(), network=DARK_NETWORK)
    assert not repaired.results[0].skipped and repaired.results[0].error is None
    assert killed.read_bytes() == complete
    redo = segment(
        sync_config([slide], killed, threshold=0.6, overwrite=True),
        predictor=DarkPredictor(),
        network=DARK_NETWORK,
    )
    assert not redo.results[0].skipped and redo.results[0].error is None


def test_other_settings_on_an_unfinished_store_are_refused(tmp_path: Path) -> None:
    from synthetic import synthetic_he

    from wsiuda.errors import OutputError
    from wsiuda.io.maskstore import MaskStore

    slide = write_slide(tmp_path / "s.svs", synthetic_he((128, 128), seed=1), mpp=0.25, app_mag=40)
    out = tmp_path / "n.geojson"
    segment(sync_config([slide], out), predictor=DarkPredictor(), network=DARK_NETWORK)
    out.unlink()
    MaskStore.open(tmp_path / "n.mask.zarr").update_metadata(complete=False)
    report = segment(
        sync_config([slide], out, threshold=0.7), predictor=DarkPredictor(), network=DARK_NETWORK
    )
    (result,) = report.results
    assert result.error is not None and "--overwrite" in result.error
    with pytest.raises(OutputError):
        MaskStore.open(tmp_path)  # not a store


@pytest.mark.parametrize("crf", [True, False])
def test_crf_helpers_start_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crf: bool
) -> None:
    """A lone local worker runs its tasks in this process: its CRF helpers start first, on the core that
    idles while the model loads; without the CRF none start."""
    import wsiuda.pipelines.segment.driver as driver
    from wsiuda.errors import ModelError

    slide = write_slide(tmp_path / "s.tif", disk_image((256, 256), [(100, 100, 20)]), mpp=0.25, app_mag=40)
    model = save_dark_model(tmp_path / "m.pt")
    calls: list[tuple[str, int]] = []

    def resolve_model(config: SegmentConfig, run: object) -> None:
        calls.append(("resolve_model", 0))
        raise ModelError("stop before any tile")

    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # two tasks side by side, a helper each
    monkeypatch.setattr(
        driver, "start_helpers", lambda helpers, preload=(): calls.append(("start_helpers", helpers))
    )
    monkeypatch.setattr(driver, "resolve_model", resolve_model)
    config = SegmentConfig(
        inputs=(str(slide),), output=str(tmp_path / "n.geojson"), model=str(model), crf=crf, workers=1
    )
    with pytest.raises(ModelError, match="stop before any tile"):
        segment(config)
    assert calls == ([("start_helpers", 2)] if crf else []) + [("resolve_model", 0)]


def test_the_domain_shift_score_of_a_core_matches_every_pixel_of_its_tissue() -> None:
    # The score reads a quarter of a core's pixels; it must estimate the entropy over the tissue of
    # every pixel, for a core all tissue and for one half tissue.
    from wsiuda.geometry import Region
    from wsiuda.pipelines.segment import binary_entropy
    from wsiuda.pipelines.segment.tasks import TissueCrop, _entropy_over_tissue

    rng = np.random.default_rng(1)
    smooth = cv2.GaussianBlur(rng.random((300, 400)).astype(np.float32), (0, 0), 5)
    probability = np.clip((smooth - smooth.min()) / np.ptp(smooth), 0, 1).astype(np.float32)
    probability[:, 200:] *= 0.02  # the half off the tissue: the network sure there
    core = Region(600, 800, 300, 400)  # a core of the working grid; the tissue mask has 50 px cells
    entropy = binary_entropy(probability).astype(np.float64)
    everywhere = TissueCrop(np.ones((6, 8), bool), 12, 16, 50.0)
    half = TissueCrop(np.repeat([[True] * 4 + [False] * 4], 6, axis=0), 12, 16, 50.0)
    for crop in (None, everywhere):
        summed, pixels = _entropy_over_tissue(probability, core, crop)
        assert pixels == core.height * core.width
        assert summed == pytest.approx(entropy.sum(), rel=0.01)
    summed, pixels = _entropy_over_tissue(probability, core, half)
    assert not half.everywhere
    assert pixels == core.height * core.width / 2
    assert summed == pytest.approx(entropy[:, :200].sum(), rel=0.01)
    assert summed / pixels != pytest.approx(entropy.mean(), rel=0.01)  # the tissue half, not the core


def test_the_local_cluster_leaves_out_the_dashboards_periodic_work(tmp_path: Path) -> None:
    """The lone local worker shares this process's cores with the forward passes: no statistical profiler,
    and the event-loop watchdogs wake once a second rather than 50 times."""
    from wsiuda.pipelines.segment.cluster import cluster_client

    config = SegmentConfig(inputs=("slide.svs",), output=str(tmp_path / "n.geojson"), workers=1)
    with cluster_client(config) as client:
        scheduler = client.cluster.scheduler
        (worker,) = client.cluster.workers.values()
        assert scheduler.periodic_callbacks["tick"].callback_time == 1000
        assert worker.periodic_callbacks["tick"].callback_time == 1000
        assert "profile" not in worker.periodic_callbacks
