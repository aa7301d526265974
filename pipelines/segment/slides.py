"""Preparing a slide: its geometry, tissue, blocks and halo, its mask store, and its tasks' job."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsiuda import __version__
from wsiuda.blocks import Block, batches, halo_px, nucleus_reach_px, plan_blocks, window_size
from wsiuda.config import config_to_dict
from wsiuda.crf import crf_reach_px
from wsiuda.errors import OutputError, SlideError
from wsiuda.geometry import Region
from wsiuda.io.maskstore import MaskStore
from wsiuda.pipelines.segment.cluster import crf_helpers_per_worker, local_workers, threads_per_worker
from wsiuda.pipelines.segment.config import SegmentConfig
from wsiuda.pipelines.segment.model import NetworkInfo
from wsiuda.pipelines.segment.outputs import SlideOutputs, SlideResult
from wsiuda.pipelines.segment.sources import SourceSpec
from wsiuda.pipelines.segment.tasks import SlideJob, TissueCrop, alignment_px

log = logging.getLogger(__name__)


@dataclass
class PreparedSlide:
    """Driver-side state of one slide being segmented."""

    source: SourceSpec
    outputs: SlideOutputs
    job: SlideJob
    metadata: dict[str, Any]
    planned: int
    batches: list[tuple[list[Block], list[TissueCrop | None]]]
    started: float
    failed: str | None = None
    remaining: int = 0


def prepare_slide(
    source: SourceSpec, outputs: SlideOutputs, config: SegmentConfig, network: NetworkInfo, working_mpp: float
) -> PreparedSlide | SlideResult:
    """Open the source, plan its blocks and create or reopen its mask store."""
    started = time.perf_counter()
    if source.kind == "tiles":
        geometry = _tile_store_geometry(source, working_mpp)
    else:
        geometry = _slide_geometry(source, config, working_mpp)
    tile, shape, scale = geometry.tile, geometry.shape, geometry.scale
    crf = config.crf_params if config.crf else None
    reach = nucleus_reach_px(config.max_nucleus_diameter_um / working_mpp)
    factor = config.nuclei_factor(working_mpp)
    nuclei_mpp = working_mpp * factor
    halo = halo_px(
        receptive_field_px=network.receptive_field_px,
        crf_reach_px=crf_reach_px(crf) if crf is not None else 0,
        nucleus_reach_px=reach + alignment_px(factor, crf),
    )
    cores = [core.clip(*shape) for core in geometry.cores]
    blocks = plan_blocks(
        [c for c in cores if c.height and c.width], tile=tile, halo=halo, align=network.align
    )
    fingerprint = {
        "source": str(Path(source.path).resolve()),
        "model": network.identity,
        "working_mpp": working_mpp,
        "scale": scale,
        "tile": tile,
        "halo": halo,
        "crf": config_to_dict(crf) if crf is not None else None,
        "threshold": config.threshold,
        "min_nucleus_area_um2": config.min_nucleus_area_um2,
        "max_nucleus_diameter_um": config.max_nucleus_diameter_um,
        "split_depth_um": config.split_depth_um,
        "nuclei_mpp": nuclei_mpp,
        "min_tissue": config.min_tissue,
        "blocks": len(blocks),
    }
    store = _open_store(outputs, config, shape=shape, tile=tile, mpp=working_mpp, fingerprint=fingerprint)
    if store is None:
        return SlideResult(source.path, geojson=str(outputs.geojson), skipped=True)
    done = store.done_tiles()
    todo = [block for block in blocks if not done[block.index]]
    if len(todo) < len(blocks):
        log.info(
            "%s: resuming, %d of %d tiles already done", source.path, len(blocks) - len(todo), len(blocks)
        )
    job = SlideJob(
        source=source,
        key=Path(geometry.metadata["slide"]["path"]).name,
        scale=scale,
        level0_mpp=geometry.level0_mpp,
        working_mpp=working_mpp,
        shape=shape,
        level0_shape=geometry.level0_shape,
        store=str(outputs.store),
        crf=crf,
        threshold=config.threshold,
        nuclei_factor=factor,
        min_area_px=round(config.min_nucleus_area_um2 / nuclei_mpp**2),
        split_depth_px=config.split_depth_um / nuclei_mpp,
        nucleus_reach_px=reach,
        crf_reach_px=crf_reach_px(crf) if crf is not None else 0,
        threads=1 if threads_per_worker(config) else 0,
        crf_helpers=crf_helpers_per_worker(config),
        network_slots=network.concurrent_forwards,
    )
    crops = [_tissue_crop(geometry.tissue, block.core, scale) for block in todo]
    size = config.batch_size or network.batch_size
    grouped = [
        (group, crops[start : start + len(group)])
        for start, group in zip(range(0, len(todo), size), batches(todo, size), strict=True)
    ]
    metadata = {
        **geometry.metadata,
        "run": {
            "scheduler": config.scheduler or "local",
            "workers": local_workers(config) if not config.scheduler else None,
            "threads_per_worker": threads_per_worker(config) or None,
            "batch_size": size,
            "precision": network.precision,
        },
        "working": {
            "mpp": working_mpp,
            "scale": scale,
            "shape": list(shape),
            "tile": tile,
            "halo": halo,
            "nuclei_mpp": nuclei_mpp,
            "window": window_size(tile=tile, halo=halo, align=network.align),
        },
    }
    return PreparedSlide(source, outputs, job, metadata, len(blocks), grouped, started)


@dataclass(frozen=True)
class _Geometry:
    shape: tuple[int, int]
    level0_shape: tuple[int, int]
    scale: float
    level0_mpp: float
    tile: int
    cores: list[Region]
    tissue: tuple[np.ndarray, float] | None
    """The tissue mask and its pixel size in level-0 px."""
    metadata: dict[str, Any]


def _slide_geometry(source: SourceSpec, config: SegmentConfig, working_mpp: float) -> _Geometry:
    from wsiuda.io import open_slide
    from wsiuda.tiling import slide_mpp, tile_grid, tissue_mask, working_scale, working_shape

    with open_slide(source.path, backend=source.backend, slide_mpp=source.slide_mpp) as reader:
        info = reader.info
        scale = working_scale(info, working_mpp)
        level0_mpp = slide_mpp(info)
        shape = working_shape(info.shape, scale)
        tissue = tissue_mask(reader)
    cores = tile_grid(shape, tile=config.tile, tissue=tissue, scale=scale, min_tissue=config.min_tissue)
    metadata = {
        "slide": {
            "path": info.path,
            "backend": info.backend,
            "vendor": info.vendor,
            "shape": list(info.shape),
            "levels": info.level_count,
            "mpp": level0_mpp,
            "objective_power": info.objective_power,
        }
    }
    return _Geometry(
        shape, info.shape, scale, level0_mpp, config.tile, cores, (tissue.mask, tissue.pixel_size), metadata
    )


def _tile_store_geometry(source: SourceSpec, working_mpp: float) -> _Geometry:
    """The geometry of a store written by ``wsiuda tile`` (see pipelines/tile.py for its attributes)."""
    from wsiuda.io.store import INCOMPLETE, TileStore

    store = TileStore.open(Path(source.path))
    attrs = store.attrs
    if not store.is_complete:
        raise SlideError(f"{source.path}: {INCOMPLETE}")
    try:
        store_mpp = float(attrs["target_mpp"])
        level0_mpp = float(attrs["slide_mpp"])
        scale = float(attrs["scale"])
        height, width = (int(side) for side in attrs["working_shape"])
        level0_height, level0_width = (int(side) for side in attrs["slide_shape"])
        slide_path = str(attrs["source"]["path"])
    except (KeyError, TypeError, ValueError) as error:
        raise SlideError(f"{source.path}: tile store lacks {error}; re-tile it with this wsiuda") from None
    if abs(store_mpp / working_mpp - 1) > 1e-3:
        raise SlideError(
            f"{source.path} was tiled at {store_mpp:g} µm/px but segmenting works at {working_mpp:g} µm/px; "
            f"pass --mpp {store_mpp:g} or re-tile with `wsiuda tile --mpp {working_mpp:g}`"
        )
    metadata = {
        "slide": {
            "path": slide_path,
            "backend": attrs.get("backend"),
            "vendor": attrs.get("vendor"),
            "shape": attrs.get("slide_shape"),
            "mpp": level0_mpp,
            "objective_power": attrs.get("objective_power"),
            "tile_store": source.path,
        },
    }
    return _Geometry(
        (height, width),
        (level0_height, level0_width),
        scale,
        level0_mpp,
        store.tile,
        store.core_regions,
        store.tissue_mask(),
        metadata,
    )


def _tissue_crop(tissue: tuple[np.ndarray, float] | None, core: Region, scale: float) -> TissueCrop | None:
    if tissue is None:
        return None
    mask, pixel_size = tissue
    factor = scale * pixel_size
    y0, x0 = int(core.y // factor), int(core.x // factor)
    y1, x1 = int(-(-core.y1 // factor)), int(-(-core.x1 // factor))
    crop = mask[y0:y1, x0:x1]
    if crop.size == 0:
        return None
    return TissueCrop(np.ascontiguousarray(crop, dtype=bool), y0, x0, factor)


def _open_store(
    outputs: SlideOutputs,
    config: SegmentConfig,
    *,
    shape: tuple[int, int],
    tile: int,
    mpp: float,
    fingerprint: dict[str, Any],
) -> MaskStore | None:
    """The slide's store, new or to resume; None when an earlier run already finished the slide."""
    path = outputs.store
    for file in (outputs.geojson, outputs.overlay, outputs.summary):
        if file.is_dir():  # found now, not once every tile is done and the file cannot be written
            raise OutputError(
                f"{file} is a folder where an output file goes; move it away or choose another -o"
            )
    fresh = json.loads(json.dumps(fingerprint))  # as it reads back from the store's JSON attributes
    if path.exists() and not MaskStore.exists(path):
        raise OutputError(f"{path} exists and is not a wsiuda mask store; move it away or choose another -o")
    if MaskStore.exists(path) and not config.overwrite:
        store = MaskStore.open(path)
        if store.metadata.get("fingerprint") != fresh:
            raise OutputError(
                f"{path} holds a run with other settings, model or slide; pass --overwrite to redo it"
            )
        if store.complete and outputs.geojson.exists():
            written = store.metadata.get("geojson_bytes")
            if written is None or outputs.geojson.stat().st_size == written:
                return None
            # Cut short or changed since: written again from the store's features, no tile is rerun.
            log.warning("%s is not the GeoJSON this slide's run wrote; writing it again", outputs.geojson)
        return store
    if outputs.geojson.exists() and not config.overwrite:
        raise OutputError(f"{outputs.geojson} already exists; pass --overwrite to replace it")
    return MaskStore.create(
        path, shape=shape, tile=tile, mpp=mpp, metadata={"fingerprint": fresh, "wsiuda_version": __version__}
    )
