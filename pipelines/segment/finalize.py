"""A slide's last step once its tiles are done: GeoJSON, overlay, summary, then the store marked complete."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np

from wsiuda import __version__
from wsiuda.config import atomic_write_text
from wsiuda.errors import WsiudaError
from wsiuda.io.geojson import GeoJsonWriter, exterior_rings
from wsiuda.io.maskstore import MaskStore
from wsiuda.pipelines.segment.config import SegmentConfig
from wsiuda.pipelines.segment.outputs import SlideResult
from wsiuda.pipelines.segment.slides import PreparedSlide

log = logging.getLogger(__name__)


SUMMARY_FORMAT = 1


def finalize_slide(slide: PreparedSlide, config: SegmentConfig) -> SlideResult:
    """Stream the tiles' features into the GeoJSON, draw the overlay, write the summary, mark complete."""
    from wsiuda.overlay import draw_outline_batches, write_png

    clock = time.perf_counter()
    store = MaskStore.open(slide.outputs.store)
    done = store.done_tiles()
    indices = [tuple(int(v) for v in index) for index in np.argwhere(done)]  # row-major
    thumbnail, thumb_scale = _thumbnail(slide, config.overlay_size)

    count = 0
    with GeoJsonWriter(slide.outputs.geojson) as writer:

        def rings() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            # Each tile's features are written as they are drawn: one pass, one tile in memory at a time.
            for index in indices:
                lines = store.tile_features(index)  # type: ignore[arg-type]
                writer.write_lines(lines)
                yield exterior_rings(lines)

        overlay = draw_outline_batches(thumbnail, rings(), scale=thumb_scale)
        count = writer.count
    geojson_s = time.perf_counter() - clock
    write_png(slide.outputs.overlay, overlay)

    stats = store.tile_stats(done)
    tissue_px = stats["tissue_px"]
    summary = {
        "format": SUMMARY_FORMAT,
        "wsiuda_version": __version__,
        "source": slide.source.path,
        "kind": slide.source.kind,
        **slide.metadata,
        "model": store.metadata["fingerprint"]["model"],
        "crf": config.crf,
        "tiles": {
            "planned": slide.planned,
            "run_now": sum(len(blocks) for blocks, _ in slide.batches),
            "resumed": slide.planned - sum(len(blocks) for blocks, _ in slide.batches),
        },
        "nuclei": count,
        "timings_s": {
            "read": stats["read_s"],
            "predict": stats["predict_s"],
            "crf": stats["crf_s"],
            "instances": stats["instances_s"],
            "polygons": stats["polygons_s"],
            "geojson_and_overlay": geojson_s,
            "wall_this_run": time.perf_counter() - slide.started,
        },
        "domain_shift": {
            "mean_entropy_bits": stats["entropy_sum"] / tissue_px if tissue_px else None,
            "tissue_px": int(tissue_px),
            "about": "mean binary entropy of the network's probability over tissue (0 sure .. 1 unsure); "
            "slides far from the training data score high",
        },
        "outputs": {name: str(path) for name, path in asdict(slide.outputs).items()},
    }
    atomic_write_text(slide.outputs.summary, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    # The GeoJSON's size, so that a rerun tells the file it wrote from one cut short or changed since.
    store.mark_complete(nuclei=count, geojson_bytes=slide.outputs.geojson.stat().st_size)
    log.debug("%s: %d nuclei → %s", slide.source.path, count, slide.outputs.geojson)
    return SlideResult(
        slide.source.path, geojson=str(slide.outputs.geojson), nuclei=count, tiles=slide.planned
    )


def _thumbnail(slide: PreparedSlide, size: int) -> tuple[np.ndarray, float]:
    """An RGB thumbnail of the slide (longer side about ``size``) and its px per level-0 px."""
    import cv2

    from wsiuda.io import open_slide
    from wsiuda.tiling import effective_downsample, level_for_scale, read_thumbnail, working_shape

    level0 = slide.job.level0_shape
    pixel_size = max(1.0, max(level0) / size)
    height, width = working_shape(level0, 1.0 / pixel_size)
    path = slide.metadata.get("slide", {}).get("path", slide.source.path)
    try:
        with open_slide(path, backend=slide.source.backend, slide_mpp=slide.source.slide_mpp) as reader:
            # Read a whole number of the pyramid level's px per pixel, then shrink the rest of the way: the
            # exact, tile-invariant resampling that a fractional ratio takes is 50x slower (timed by hand)
            # and buys a picture nothing.
            downsamples = reader.info.level_downsamples
            step = effective_downsample(downsamples[level_for_scale(downsamples, 1.0 / pixel_size)])
            finer = read_thumbnail(reader, pixel_size=step * max(1, math.floor(pixel_size / step)))
    except (WsiudaError, OSError):
        # A tile store whose slide is gone: outlines on white.
        return np.full((height, width, 3), 255, np.uint8), 1.0 / pixel_size
    return cv2.resize(finer, (width, height), interpolation=cv2.INTER_AREA), 1.0 / pixel_size
