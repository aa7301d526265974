"""Core/halo geometry, ownership, stitching, and tiled prediction equal to whole-image prediction."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from wsiuda.blocks import (
    block_for,
    grid_cores,
    halo_px,
    is_responsible,
    nucleus_reach_px,
    plan_blocks,
    stitch,
    window_size,
)
from wsiuda.geometry import Region


def test_halo_adds_half_the_receptive_field_the_crf_reach_and_the_largest_nucleus() -> None:
    assert halo_px(receptive_field_px=200, crf_reach_px=60, nucleus_reach_px=43) == 100 + 60 + 43
    assert halo_px(receptive_field_px=45, crf_reach_px=0, nucleus_reach_px=0) == 23
    with pytest.raises(ValueError):
        halo_px(receptive_field_px=-1, crf_reach_px=0, nucleus_reach_px=0)
    assert nucleus_reach_px(64) == 43  # a 16 µm nucleus at 0.25 µm/px


@pytest.mark.parametrize(("tile", "halo", "align"), [(37, 27, 4), (64, 0, 1), (100, 13, 16), (50, 70, 8)])
def test_windows_hold_core_and_halo_are_aligned_and_equal_in_size(tile: int, halo: int, align: int) -> None:
    shape = (233, 311)
    blocks = plan_blocks(grid_cores(shape, tile=tile), tile=tile, halo=halo, align=align)
    size = window_size(tile=tile, halo=halo, align=align)
    assert size % align == 0
    for block in blocks:
        window, core = block.window, block.core
        assert window.shape == (size, size)
        assert window.y % align == 0 and window.x % align == 0
        assert window.y <= core.y - halo and window.x <= core.x - halo
        assert window.y1 >= core.y + tile + halo and window.x1 >= core.x + tile + halo
        assert block.index == (core.y // tile, core.x // tile)


def test_block_for_refuses_regions_off_the_grid() -> None:
    with pytest.raises(ValueError):
        block_for(Region(5, 0, 10, 10), tile=10, halo=2)
    with pytest.raises(ValueError):
        block_for(Region(0, 0, 11, 10), tile=10, halo=2)


def test_a_region_moves_out_onto_a_grid_of_the_outer_frame_and_in_at_the_image_edge() -> None:
    # The region's frame starts at (5, 8) of the outer frame, whose grid lines are at multiples of 4.
    moved = Region(3, 2, 10, 11).on_grid(4, origin=(5, 8), within=(40, 40))
    assert moved == Region(3, 0, 12, 16)  # outer rows 8..20, columns 8..24
    assert (moved.y + 5) % 4 == 0 and (moved.x + 8) % 4 == 0 and moved.height % 4 == moved.width % 4 == 0
    # Where moving out would leave the 14 x 14 image, the edge moves in instead: the top (outer row 3
    # would go to 0, row -2 here) and the right (column 13 would go to 16).
    assert Region(1, 1, 12, 12).on_grid(4, origin=(2, 0), within=(14, 14)) == Region(2, 0, 12, 12)
    assert Region(3, 2, 10, 11).on_grid(1, origin=(5, 8), within=(40, 40)) == Region(3, 2, 10, 11)


def test_every_point_has_exactly_one_owner() -> None:
    shape = (230, 310)
    cores = grid_cores(shape, tile=64)
    rng = np.random.default_rng(0)
    points = np.concatenate(
        [rng.uniform(0, 1, (500, 2)) * shape, [[64.0, 64.0], [0.0, 0.0], [63.999, 128.0], [229.9, 309.9]]]
    )
    for y, x in points:
        assert sum(is_responsible(core, y, x) for core in cores) == 1, (y, x)


@pytest.mark.parametrize("backend", ["numpy", "zarr"])
def test_stitching_windows_rebuilds_the_image(backend: str) -> None:
    shape, tile, halo = (150, 170), 40, 9
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, shape, dtype=np.uint8)
    padded = np.pad(image, 200)
    out = (
        np.zeros(shape, np.uint8)
        if backend == "numpy"
        else zarr.create_array(store={}, shape=shape, chunks=(tile, tile), dtype="uint8")
    )
    for block in plan_blocks(grid_cores(shape, tile=tile), tile=tile, halo=halo, align=4):
        window = padded[(block.window.y + 200) :, (block.window.x + 200) :][
            : block.window.height, : block.window.width
        ]
        stitch(block, window, out)
    np.testing.assert_array_equal(np.asarray(out[...]), image)


def test_crop_core_refuses_arrays_of_another_size() -> None:
    block = block_for(Region(0, 0, 10, 10), tile=10, halo=3)
    with pytest.raises(ValueError):
        block.crop_core(np.zeros((5, 5)))


# --------------------------------------------------------------------------------- tiled equals whole
def tiny_unet_predictor(depth: int = 2, precision: str = "float32"):  # type: ignore[no-untyped-def]
    import torch

    from wsiuda.models import ModelMeta, Segmenter, build_unet

    torch.manual_seed(0)
    torch.set_num_threads(1)
    meta = ModelMeta(arch_kwargs={"width": 4, "depth": depth}, mpp=0.25)
    network = build_unet(width=4, depth=depth)
    with torch.no_grad():  # spread the untrained network's output over (0, 1) so differences show
        network.head.weight.mul_(30.0)
    if precision == "int8":
        images = list(np.random.default_rng(9).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
        meta = Segmenter.from_network(network, meta).calibrated_meta(images)
    return Segmenter.from_network(network, meta, device="cpu", precision=precision)


def tiled_prediction(image: np.ndarray, predict, *, tile: int, halo: int, align: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Predict window by window (white outside the image, as slides read) and stitch the cores."""
    shape = image.shape[:2]
    margin = tile + 2 * halo + 2 * align
    padded = np.pad(image, ((margin, margin), (margin, margin), (0, 0)), constant_values=255)
    out = np.zeros(shape, np.float32)
    for block in plan_blocks(grid_cores(shape, tile=tile), tile=tile, halo=halo, align=align):
        w = block.window
        window = padded[w.y + margin : w.y1 + margin, w.x + margin : w.x1 + margin]
        stitch(block, predict(window[None])[0], out)
    return out


@pytest.mark.parametrize(
    ("tile", "extra_halo", "precision"),
    [(37, 5, "float32"), (64, 0, "float32"), (90, 3, "float32"), (37, 5, "int8"), (90, 3, "int8")],
)
def test_tiled_prediction_equals_whole_image_prediction_in_the_interior(
    tile: int, extra_halo: int, precision: str
) -> None:
    """Also in int8: its ranges are fixed by the calibration, not by what a tile holds."""
    segmenter = tiny_unet_predictor(precision=precision)
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (200, 236, 3), dtype=np.uint8)  # sides multiples of 2**depth: no padding
    whole = segmenter.predict(image[None])[0]
    context = -(-segmenter.meta.receptive_field_px // 2)
    halo = halo_px(
        receptive_field_px=segmenter.meta.receptive_field_px, crf_reach_px=0, nucleus_reach_px=extra_halo
    )
    tiled = tiled_prediction(image, segmenter.predict, tile=tile, halo=halo, align=2**segmenter.meta.depth)
    interior = (slice(context, -context), slice(context, -context))
    assert whole[interior].std() > 0.03  # the check below has something to compare
    np.testing.assert_allclose(tiled[interior], whole[interior], atol=1e-5)


def test_without_alignment_pooling_breaks_the_equality() -> None:
    """The same check fails when windows start off the network's stride: alignment is what makes it hold."""
    segmenter = tiny_unet_predictor()
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (200, 236, 3), dtype=np.uint8)
    whole = segmenter.predict(image[None])[0]
    context = -(-segmenter.meta.receptive_field_px // 2)
    # align=1 with an odd halo starts windows at odd offsets; the Segmenter then pads them itself.
    tiled = tiled_prediction(image, segmenter.predict, tile=37, halo=context + 1, align=1)
    interior = (slice(context, -context), slice(context, -context))
    assert np.abs(tiled[interior] - whole[interior]).max() > 1e-2
