"""What a worker does with a batch of blocks: read, network, CRF, nuclei, polygons, store write.

Everything a task needs travels in a small picklable :class:`SlideJob`; the slide is opened by path and the
model taken from the worker's own cache, so nothing unpicklable enters the graph.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wsiuda.blocks import Block
from wsiuda.crf import CrfParams, crf_grid_period
from wsiuda.errors import ModelError
from wsiuda.geometry import Region
from wsiuda.io.geojson import feature_id, feature_lines
from wsiuda.io.maskstore import MaskStore, label_dtype
from wsiuda.pipelines.crf_helper import PendingCrf
from wsiuda.pipelines.segment.model import Predictor, forward_slots
from wsiuda.pipelines.segment.sources import SourceSpec, WindowReader, shared_reader


@dataclass(frozen=True)
class SlideJob:
    """Everything a worker needs to process blocks of one slide (small and picklable)."""

    source: SourceSpec
    key: str
    """Names the slide in feature ids."""
    scale: float
    level0_mpp: float
    working_mpp: float
    shape: tuple[int, int]
    level0_shape: tuple[int, int]
    store: str
    crf: CrfParams | None
    threshold: float
    nuclei_factor: int
    """Working px per px of the grid the nuclei are labelled and outlined on (SegmentConfig.nuclei_mpp)."""
    min_area_px: int
    """Smallest nucleus, in px of the nuclei grid."""
    split_depth_px: float
    """Split depth, in px of the nuclei grid."""
    nucleus_reach_px: int
    """How far an owned nucleus can reach past the core (the nucleus share of the halo)."""
    crf_reach_px: int
    threads: int = 0
    """OpenCV threads per task (0: OpenCV's default); tasks sharing a machine compute on one thread each."""
    crf_helpers: int = 0
    """Helper processes that run the CRF (see crf_helper), one per task where tasks of one worker run side
    by side; 0: the CRF runs in the task's thread."""
    network_slots: int = 1
    """Tasks of one worker that may be in the network at once."""

    def work_boxes(self, block: Block) -> tuple[Region, Region]:
        """(nuclei box, CRF box) of a block, in its window's frame.

        Each step works on the smallest part of the window it needs: nuclei only where an owned nucleus
        can be (the core grown by the nucleus reach), the CRF only that plus its reach. The outer margin
        of the window served the network alone.

        Both boxes lie on slide-wide grids: the nuclei box on the nuclei grid, the CRF box on the CRF's
        grid too, so that blocks that see the same nucleus see it on the same pixels and refine and label
        it alike. On a CRF grid of each block's own, blocks refined a nucleus on a core's border
        differently, each put its centroid in the other's core, and neither wrote it.
        """
        shape = block.window.shape
        origin = (block.window.y, block.window.x)
        # +1: an edge to see where the box cuts a nucleus.
        wanted = block.core_in_window.grow(self.nucleus_reach_px + 1).clip(*shape)
        nuclei_box = wanted.on_grid(self.nuclei_factor, origin=origin, within=shape)
        if self.crf is None:
            return nuclei_box, nuclei_box
        crf_box = nuclei_box.grow(self.crf_reach_px).clip(*shape)
        on_grid = crf_box.on_grid(grids_step(self.nuclei_factor, self.crf), origin=origin, within=shape)
        # Where the window's edge moved the box in past the nuclei, it keeps its own grid instead.
        return nuclei_box, on_grid if on_grid.contains(nuclei_box) else crf_box


def grids_step(nuclei_factor: int, crf: CrfParams | None) -> int:
    """The step (working px) of the grid whose lines lie on both the nuclei grid and the CRF's grid."""
    return math.lcm(nuclei_factor, crf_grid_period(crf) if crf is not None else 1)


def alignment_px(nuclei_factor: int, crf: CrfParams | None) -> int:
    """How far (px) moving the work boxes onto their grids may grow them: a part of the halo."""
    return nuclei_factor - 1 + grids_step(nuclei_factor, crf) - 1


@dataclass(frozen=True)
class TissueCrop:
    """The part of the slide's tissue mask under one core; ``factor`` working px per mask px."""

    mask: np.ndarray
    y0: int
    x0: int
    factor: float

    @property
    def everywhere(self) -> bool:
        """Whether the whole crop, and so the whole core, is tissue."""
        return bool(self.mask.all())

    def in_core(self, core: Region, *, step: int = 1) -> np.ndarray:
        """The tissue mask at every ``step``-th row and column of ``core`` (working px)."""
        rows = core.y + np.arange(0, core.height, step)
        cols = core.x + np.arange(0, core.width, step)
        rows = np.clip((rows // self.factor).astype(np.int64) - self.y0, 0, None)
        cols = np.clip((cols // self.factor).astype(np.int64) - self.x0, 0, None)
        rows = np.minimum(rows, self.mask.shape[0] - 1)
        cols = np.minimum(cols, self.mask.shape[1] - 1)
        return np.asarray(self.mask[np.ix_(rows, cols)], dtype=bool)


def process_blocks(
    job: SlideJob, blocks: Sequence[Block], tissue: Sequence[TissueCrop | None], predictor: Predictor
) -> int:
    """Run a batch of blocks of one slide end to end and record them in the mask store; returns nuclei."""
    if job.threads:
        import cv2

        cv2.setNumThreads(job.threads)
    clock = time.perf_counter()
    if job.source.kind == "slide":
        images = np.stack([shared_reader(job.source, job.scale).read(block.window) for block in blocks])
    else:
        reader = WindowReader(job.source, job.scale)
        try:
            images = np.stack([reader.read(block.window) for block in blocks])
        finally:
            reader.close()
    read_s = (time.perf_counter() - clock) / len(blocks)
    with forward_slots(job.network_slots):
        clock = time.perf_counter()
        probabilities = np.asarray(predictor(images), dtype=np.float32)
        predict_s = (time.perf_counter() - clock) / len(blocks)
    if probabilities.shape != images.shape[:3]:
        raise ModelError(f"the model returned {probabilities.shape} for images {images.shape[:3]}")
    store = MaskStore.open(job.store)
    total = 0
    for block, image, probability, crop in zip(blocks, images, probabilities, tissue, strict=True):
        stats = {"read_s": read_s, "predict_s": predict_s}
        total += _finish_block(job, block, image, probability, crop, store, stats)
    return total


def _finish_block(
    job: SlideJob,
    block: Block,
    image: np.ndarray,
    probability: np.ndarray,
    tissue: TissueCrop | None,
    store: MaskStore,
    stats: dict[str, float],
) -> int:
    """CRF, nuclei, ownership, polygons and the store write of one predicted block (on the boxes of
    :meth:`SlideJob.work_boxes`); returns its nuclei.

    Where the CRF runs in a helper process, the helper goes on with the rest (:func:`_into_store`): that
    is Python-heavy work, which in the worker would hold the GIL that the other task's forward pass needs
    between its operations.
    """
    nuclei_box, crf_box = job.work_boxes(block)
    stats["entropy_sum"], stats["tissue_px"] = _entropy_over_tissue(
        probability[block.core_in_window.as_slices()], block.core, tissue
    )
    if job.crf is None:
        stats["crf_s"] = 0.0
        return _into_store(probability[nuclei_box.as_slices()], job, block, stats, store=store)
    crf_slices = crf_box.as_slices()
    pending = PendingCrf(
        image[crf_slices],
        probability[crf_slices],
        job.crf,
        helpers=job.crf_helpers,
        then=_crf_box_into_store,
        arguments=(job, block, stats, time.monotonic()),
    )
    return int(pending.result())


def _crf_box_into_store(
    refined: np.ndarray, job: SlideJob, block: Block, stats: dict[str, float], started: float
) -> int:
    """:func:`_into_store` of a block's CRF-refined CRF box; runs where the CRF ran. ``started`` is when
    the CRF was asked for (``time.monotonic``, one clock for every process of the machine)."""
    stats["crf_s"] = time.monotonic() - started
    nuclei_box, crf_box = job.work_boxes(block)
    return _into_store(refined[_within(nuclei_box, crf_box).as_slices()], job, block, stats)


def _into_store(
    refined: np.ndarray,
    job: SlideJob,
    block: Block,
    stats: dict[str, float],
    *,
    store: MaskStore | None = None,
) -> int:
    """Nuclei, ownership, polygons and the store write of a block's refined nuclei box; returns the
    block's nuclei. Without ``store``, the job's store is opened (once per process, see _open_store)."""
    # Imported here, not with this module: their libraries (scipy, scikit-image) then load while the
    # first tiles are in the network and the CRF, not before the model can start.
    from wsiuda.instances import block_mean, centroids, from_grid, label_nuclei, owned_nuclei
    from wsiuda.polygons import nucleus_polygons

    if job.threads:  # set again here: a CRF helper is a process of its own
        import cv2

        cv2.setNumThreads(job.threads)
    clock = time.perf_counter()
    window = block.window
    nuclei_box, _ = job.work_boxes(block)
    factor = job.nuclei_factor
    on_nuclei_grid = block_mean(refined, factor)
    labels = label_nuclei(
        on_nuclei_grid,
        threshold=job.threshold,
        min_area_px=job.min_area_px,
        split_depth_px=job.split_depth_px,
    )
    ids, points = centroids(labels)
    points = from_grid(points, factor)  # ownership and ids are decided in working px, as the cores are
    core_in_box = _within(block.core_in_window, nuclei_box)
    owned, _ = owned_nuclei(labels, core_in_box, ids=ids, points=points)
    stats["instances_s"], clock = _lap(clock)

    origin = (window.y + nuclei_box.y, window.x + nuclei_box.x)  # of the box, in the working frame
    shapes = nucleus_polygons(
        labels,
        owned,
        probability=on_nuclei_grid,
        origin=(origin[0] // factor, origin[1] // factor),
        scale=job.scale / factor,
        level0_mpp=job.level0_mpp,
        level0_shape=job.level0_shape,
    )
    features = feature_lines(
        [shape.polygon for shape in shapes],
        feature_ids=[feature_id(job.key, *shape.centroid) for shape in shapes],
        measurements=[shape.measurements for shape in shapes],
    )
    stats["polygons_s"], clock = _lap(clock)

    stats["nuclei"] = len(features)
    (store or _open_store(job.store)).write_tile(
        block.index,
        block.core,
        probability=refined[core_in_box.as_slices()],
        labels=_global_labels(labels, ids, points, origin, core_in_box, job.shape, factor=factor),
        features=features,
        stats=stats,
    )
    return len(features)


AFTER_THE_CRF = (
    "scipy.ndimage",
    "skimage.segmentation",
    "shapely",
    "zarr",
    "wsiuda.pipelines.segment.tasks",
    "wsiuda.instances",
    "wsiuda.polygons",
)
"""What a CRF helper imports to go on with a tile after its CRF (:func:`_crf_box_into_store`): 0.4 s (timed
by hand), better spent while the worker imports torch than on the first tile. The third-party libraries
lead, so that the helpers' fork server imports them once for all helpers (see crf_helper)."""

_OPEN_STORES: dict[str, tuple[tuple[int, int], MaskStore]] = {}
_OPEN_STORES_LOCK = threading.Lock()


def _open_store(path: str) -> MaskStore:
    """The mask store at ``path``, opened once per process (2-3 ms a time, timed by hand) and opened again
    where the store on disk has been made anew since (--overwrite) or its metadata rewritten."""
    root = os.stat(os.path.join(path, "zarr.json"))
    version = (root.st_ino, root.st_mtime_ns)
    with _OPEN_STORES_LOCK:
        known = _OPEN_STORES.get(path)
        if known is None or known[0] != version:
            known = _OPEN_STORES[path] = (version, MaskStore.open(path))
        return known[1]


ENTROPY_STRIDE = 2
"""The domain-shift score reads every second row and column of a core: a quarter of the pixels, a third of
the time (benchmarks/results/nuclei_steps.md), for a mean over about a quarter of a million pixels a tile."""


def _entropy_over_tissue(
    probability: np.ndarray, core: Region, tissue: TissueCrop | None
) -> tuple[float, float]:
    """(summed entropy, tissue pixels) of a core's probability over its tissue, both estimated from every
    :data:`ENTROPY_STRIDE`-th row and column and scaled to the whole core."""
    step = ENTROPY_STRIDE
    entropy = binary_entropy(probability[::step, ::step])
    weight = float(step * step)
    if tissue is None or tissue.everywhere:  # most cores of a section: no mask to build
        return float(entropy.sum(dtype=np.float64)) * weight, float(entropy.size) * weight
    on_tissue = tissue.in_core(core, step=step)
    return float(entropy.sum(dtype=np.float64, where=on_tissue)) * weight, float(on_tissue.sum()) * weight


def _within(inner: Region, outer: Region) -> Region:
    """``inner`` in the pixel frame of ``outer`` (both in one frame)."""
    return Region(inner.y - outer.y, inner.x - outer.x, inner.height, inner.width)


def _lap(start: float) -> tuple[float, float]:
    now = time.perf_counter()
    return now - start, now


def _global_labels(
    labels: np.ndarray,
    ids: np.ndarray,
    points: np.ndarray,
    origin: tuple[int, int],
    core: Region,
    shape: tuple[int, int],
    *,
    factor: int = 1,
) -> np.ndarray:
    """The core's labels on the working grid, renumbered slide-wide: a nucleus's id is 1 + the working-grid
    index of its centroid.

    ``labels`` lie on a grid ``factor`` times coarser than the working one, from ``origin`` in the working
    frame; ``points`` are their centroids and ``core`` the core, both in working px from ``origin``. Every
    block that sees a nucleus whole computes the same centroid, so a nucleus spanning cores keeps one id.
    """
    dtype = label_dtype(shape)
    lookup = np.zeros(int(labels.max()) + 1, dtype=dtype)
    if len(ids):
        y = np.clip(np.floor(points[:, 0] + origin[0]), 0, shape[0] - 1).astype(np.uint64)
        x = np.clip(np.floor(points[:, 1] + origin[1]), 0, shape[1] - 1).astype(np.uint64)
        lookup[ids] = (y * np.uint64(shape[1]) + x + np.uint64(1)).astype(dtype)
    rows = np.arange(core.y, core.y1) // factor
    cols = np.arange(core.x, core.x1) // factor
    # Each coarse pixel repeated over the working pixels it covers: the core's rows, then its columns.
    return (
        lookup[labels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]]
        .take(rows - rows[0], axis=0)
        .take(cols - cols[0], axis=1)
    )


def binary_entropy(probability: np.ndarray) -> np.ndarray:
    """Entropy in bits of a foreground probability: 0 where the network is sure, 1 at p = 0.5.

    float32, as the network's probabilities are: twice as fast as float64 on a tile, and a tile's sum
    (taken in float64) moves by about 1e-8 of itself.
    """
    p = np.clip(np.asarray(probability, dtype=np.float32), np.float32(1e-7), np.float32(1 - 1e-7))
    q = 1 - p
    return np.asarray(-(p * np.log2(p) + q * np.log2(q)))
