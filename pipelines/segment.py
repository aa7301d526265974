"""``wsiuda segment``: slides → nuclei as GeoJSON for QuPath, a mask store, an overlay and a summary.

Per slide, the driver reads the metadata and the tissue mask, plans blocks (core tiles of the working grid
plus a halo derived from the network's receptive field, the CRF's reach and the largest nucleus) and
creates or reopens the slide's mask store. Batches of blocks then run as Dask tasks, each on one worker:

    read windows → batch → network S → dense CRF → label nuclei (watershed split) → keep the nuclei whose
    centroid lies in the core → polygons in level-0 px of the original slide → write the core's masks and
    the tile's features into the store and mark the tile done

Workers open the slide by path and keep one model per process (loaded once; nothing unpicklable travels in
the graph). When a slide's tiles are all done the driver streams the features, tile by tile in row-major
order, into the GeoJSON, draws the overlay and writes the summary; only then is the store marked
complete. A killed run resumes from the tiles marked done and writes the same GeoJSON byte for byte:
feature ids are uuid5 of the slide's name and the nucleus's position.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from wsiuda import __version__
from wsiuda.allocator import ENVIRONMENT as ALLOCATOR_ENVIRONMENT
from wsiuda.blocks import Block, batches, halo_px, nucleus_reach_px, plan_blocks, window_size
from wsiuda.config import atomic_write_text, check_precision, config_to_dict, save_config
from wsiuda.crf import DEFAULT_CRF, CrfParams, crf_reach_px
from wsiuda.errors import ConfigError, ModelError, OutputError, SlideError, WsiudaError
from wsiuda.geometry import Region
from wsiuda.io.dispatch import BACKENDS
from wsiuda.io.geojson import GEOJSON_SUFFIXES, GeoJsonWriter, dump_feature, feature_id, nucleus_feature
from wsiuda.io.maskstore import MaskStore, label_dtype
from wsiuda.pipelines.crf_helper import PendingCrf, shutdown_helper, start_helpers

log = logging.getLogger(__name__)

Predictor = Callable[[np.ndarray], np.ndarray]
"""uint8 RGB (N, H, W, 3) at the working mpp → float32 (N, H, W) foreground probabilities."""
Task = tuple[Any, ...]
Runner = Callable[[Callable[..., Any], Iterable[tuple[Task, Any]]], Iterator[tuple[Any, Any]]]
"""Runs ``fn(*args)`` for each (args, tag) and yields (tag, result or WsiudaError) as tasks finish."""

SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"}
    | {".png", ".jpg", ".jpeg", ".bmp"}
)
SCHEDULER_SYNC = "sync"
SUMMARY_FORMAT = 1


# ------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SegmentConfig:
    """Everything ``wsiuda segment`` does is decided here; saved as YAML beside the outputs."""

    inputs: tuple[str, ...]
    """Slides (any backend), tile stores from ``wsiuda tile``, or folders of slides/images."""
    output: str
    """A .geojson / .geojson.gz file (one input slide) or a folder (any number of slides)."""
    model: str | None = None
    """A model.pt from ``wsiuda adapt``; None takes the default model."""
    device: str = "auto"
    precision: str = "auto"
    """float32, int8 (CPU only) or auto: int8 on a CPU where the model file carries its int8 calibration."""
    crf: bool = True
    crf_params: CrfParams = DEFAULT_CRF
    mpp: float | None = None
    """Working resolution, µm/px; None takes the model's."""
    slide_mpp: float | None = None
    backend: str = "auto"
    tile: int = 1024
    """Core tile side at the working mpp, px (the halo comes on top)."""
    batch_size: int | None = None
    """Tiles per batch; None: 1 on a CPU (a 1024 tile's window needs ~1 GB in the network), 4 on a GPU."""
    workers: int | None = None
    """Local workers; None: one per 2 cores, as far as memory allows (see local_workers). Several run as
    processes; a lone worker runs in this process."""
    scheduler: str | None = None
    """None: a local cluster; 'sync': in this process, a batch at a time; else a dask.distributed address."""
    overwrite: bool = False
    threshold: float = 0.5
    min_nucleus_area_um2: float = 6.0
    max_nucleus_diameter_um: float = 16.0
    """Largest nucleus expected: sets the part of the halo that lets a nucleus be seen whole."""
    split_depth_um: float = 0.5
    """Touching nuclei split where the neck is at least this much narrower (half-width) than the nuclei."""
    min_tissue: float = 0.05
    """Tiles with less tissue than this fraction are skipped (0 keeps every tile)."""
    gzip: bool = False
    """In folder mode, write .geojson.gz files."""
    overlay_size: int = 2048

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("give at least one slide, tile store or folder to segment")
        if not self.output:
            raise ConfigError("give an output with -o (a .geojson file or a folder)")
        positive = {
            "tile": self.tile,
            "batch-size": 1 if self.batch_size is None else self.batch_size,
            "max nucleus diameter": self.max_nucleus_diameter_um,
            "overlay size": self.overlay_size,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"--{name} must be positive, got {value}")
        if self.tile < 64:
            raise ConfigError(f"--tile must be at least 64 px, got {self.tile}")
        for name, optional in (("mpp", self.mpp), ("slide-mpp", self.slide_mpp)):
            if optional is not None and not optional > 0:
                raise ConfigError(f"--{name} must be positive, got {optional}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0 <= self.min_tissue <= 1:
            raise ConfigError(f"min tissue must be in [0, 1], got {self.min_tissue}")
        if self.min_nucleus_area_um2 < 0 or self.split_depth_um < 0:
            raise ConfigError("nucleus area and split depth must be non-negative")
        check_precision(self.precision)
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown --backend {self.backend!r} (one of {', '.join(BACKENDS)})")
        if isinstance(self.crf_params, dict):  # rebuilt from YAML
            object.__setattr__(self, "crf_params", CrfParams(**self.crf_params))

    @property
    def single_file(self) -> bool:
        """Whether ``output`` names one GeoJSON file rather than a folder."""
        return self.output.lower().endswith(GEOJSON_SUFFIXES)


# -------------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class NetworkInfo:
    """What the pipeline needs to know about the network besides its predictions."""

    mpp: float
    receptive_field_px: int
    align: int = 1
    """Window origins and sizes are multiples of this (the network's total stride, 2**depth for a U-Net)."""
    identity: str = "custom"
    """Names the weights in the resume fingerprint (a file hash for model files)."""
    batch_size: int = 1
    """Tiles per batch unless the config says otherwise."""
    precision: str = "float32"
    """The arithmetic the network runs in (float32 or int8)."""
    concurrent_forwards: int = 1
    """Tasks of one worker that may be in the network at once (see _network_slots)."""


@dataclass(frozen=True)
class ModelPredictor:
    """A picklable predictor: each worker process loads the model file once and keeps it."""

    path: str
    device: str = "auto"
    batch_size: int = 1
    precision: str = "float32"
    torch_threads: int = 0
    """Threads of each forward pass (0: torch's default, all the worker's cores)."""

    def __call__(self, images: np.ndarray) -> np.ndarray:
        segmenter = load_segmenter(self.path, self.device, self.precision, self.torch_threads)
        return segmenter.predict(images, batch_size=self.batch_size)


_SEGMENTERS: dict[tuple[str, str, str], Any] = {}
_SEGMENTERS_LOCK = threading.Lock()
_NETWORK_SLOTS: dict[int, threading.Semaphore] = {}


def load_segmenter(path: str, device: str, precision: str, torch_threads: int = 0) -> Any:
    """The Segmenter of a model file, loaded once per process and shared by its task threads."""
    key = (str(path), device, precision)
    with _SEGMENTERS_LOCK:
        if key not in _SEGMENTERS:
            from wsiuda.models import Segmenter

            segmenter = Segmenter.load(path, device=device, precision=precision)
            # Also under the precision it resolved to, which is what the tasks ask for after describe_model.
            _SEGMENTERS[key] = _SEGMENTERS[(str(path), device, segmenter.precision)] = segmenter
        if torch_threads:
            import torch

            if torch.get_num_threads() != torch_threads:
                torch.set_num_threads(torch_threads)
        return _SEGMENTERS[key]


def _network_slots(count: int) -> threading.Semaphore:
    """The tasks of this process that may be in the network at once.

    In float32 that is one, on all the worker's cores: two float32 passes side by side on one thread each
    are faster (1.09-1.32x in two measurements) but take a process past 2 GB (2.3 GB). int8 activations
    are a quarter the size: side by side they gave 1.25x the throughput of one at a time on both threads,
    at 1.1 GB (default model, 1456 px windows, 2 cores; benchmarks/results/forward_arrangements.md).
    """
    with _SEGMENTERS_LOCK:
        return _NETWORK_SLOTS.setdefault(count, threading.Semaphore(count))


def describe_model(path: str, device: str, precision: str) -> tuple[float, int, int, str, str]:
    """(mpp, receptive field px, depth, device type, precision) of a model file, as loaded in this process.

    The precision comes back resolved (``auto`` becomes what this worker runs), so that every worker is
    then asked for exactly that.
    """
    segmenter = load_segmenter(path, device, precision)
    meta = segmenter.meta
    return (
        float(meta.mpp),
        int(meta.receptive_field_px),
        int(meta.depth),
        str(segmenter.device.type),
        str(segmenter.precision),
    )


def model_path(config: SegmentConfig) -> Path:
    """The model file to use, checked cheaply here (no torch in the driver): it exists and is an archive."""
    if config.model is None:
        # wsiuda.models.default_model_path, without importing torch into the driver.
        path = Path(str(resources.files("wsiuda.weights") / "default.pt"))
        if not path.is_file():
            raise ModelError(
                "no default model ships with this install yet; pass -m MODEL.pt (from `wsiuda adapt`)"
            )
        return path
    path = Path(config.model)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist; pass -m with a model.pt from `wsiuda adapt`")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path} is not a readable model file (not a torch archive written by wsiuda)")
    return path


def resolve_model(config: SegmentConfig, run: Runner) -> tuple[ModelPredictor, NetworkInfo]:
    """Describe the model by loading it on a worker (so the driver never holds torch or the network).

    The worker keeps it for its first tiles. A bad file fails here, before any slide is touched.
    """
    path = model_path(config)
    ((_, described),) = list(run(describe_model, [((str(path), config.device, config.precision), None)]))
    if isinstance(described, BaseException):
        raise described
    mpp, receptive_field, depth, device_type, precision = described
    batch_size = config.batch_size or (4 if device_type == "cuda" else 1)
    tasks = _threads_per_worker(config)
    concurrent = tasks if precision == "int8" and tasks > 1 else 1
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    info = NetworkInfo(
        mpp=mpp,
        receptive_field_px=receptive_field,
        align=2**depth,
        identity=f"{path.name}:{digest}:{precision}",
        batch_size=batch_size,
        precision=precision,
        concurrent_forwards=concurrent,
    )
    predictor = ModelPredictor(str(path), config.device, batch_size, precision, 1 if concurrent > 1 else 0)
    return predictor, info


# ------------------------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class SourceSpec:
    """An input opened by path inside each worker."""

    path: str
    kind: str  # "slide" or "tiles"
    backend: str = "auto"
    slide_mpp: float | None = None

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def stem(self) -> str:
        name = Path(self.path).name
        for suffix in (".zarr", *sorted(SLIDE_SUFFIXES, key=len, reverse=True)):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return Path(self.path).stem


def expand_inputs(inputs: Sequence[str], *, backend: str, slide_mpp: float | None) -> list[SourceSpec]:
    """Slides, tile stores and folders → one source per slide (folders: their slides and images, sorted).

    A path that does not exist is kept: it fails, with its reason, when its turn comes.
    """
    from wsiuda.io.store import is_tile_store

    sources: list[SourceSpec] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir() and is_tile_store(path):
            sources.append(SourceSpec(str(path), "tiles", backend, slide_mpp))
        elif path.is_dir():
            members = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
            stores = sorted(p for p in path.iterdir() if p.is_dir() and is_tile_store(p))
            if not members and not stores:
                raise ConfigError(f"{path}: folder holds no slides, images or tile stores")
            sources += [SourceSpec(str(p), "slide", backend, slide_mpp) for p in members]
            sources += [SourceSpec(str(p), "tiles", backend, slide_mpp) for p in stores]
        else:
            sources.append(SourceSpec(str(path), "slide", backend, slide_mpp))
    return sources


class WindowReader:
    """Reads working-grid regions of a source: a slide resampled to the working mpp, or a tile store."""

    def __init__(self, source: SourceSpec, scale: float) -> None:
        self.source = source
        self.scale = scale
        self._reader: Any = None
        self._store: Any = None
        self._cache: dict[int, np.ndarray] = {}
        if source.kind == "tiles":
            from wsiuda.io.store import TileStore

            self._store = TileStore.open(Path(source.path))
            self._cores = self._store.core_regions
            self._tile = self._store.tile
            self._by_grid = {(c.y // self._tile, c.x // self._tile): i for i, c in enumerate(self._cores)}
        else:
            from wsiuda.io import open_slide

            self._reader = open_slide(source.path, backend=source.backend, slide_mpp=source.slide_mpp)

    def read(self, region: Region) -> np.ndarray:
        if self._reader is not None:
            from wsiuda.tiling import read_working_region

            return read_working_region(self._reader, region, scale=self.scale)
        return self._read_store(region)

    def _read_store(self, region: Region) -> np.ndarray:
        """Assemble a region from the stored tiles around it; white where no tile was stored."""
        out = np.full((region.height, region.width, 3), 255, np.uint8)
        halo, tile = self._store.halo, self._tile
        reach = -(-halo // tile)
        rows = range(region.y // tile - reach, (region.y1 - 1) // tile + reach + 1)
        cols = range(region.x // tile - reach, (region.x1 - 1) // tile + reach + 1)
        hits = [self._by_grid[(r, c)] for r in rows for c in cols if (r, c) in self._by_grid]
        # Halos first, cores on top: where a halo and a neighbour's core overlap, the core wins.
        for with_halo in (True, False):
            for index in hits:
                core = self._cores[index]
                pixels = self._tile_pixels(index)
                part = core.grow(halo) if with_halo else core
                offset = halo if not with_halo else 0
                _paste(out, region, part, pixels[offset : offset + part.height, offset : offset + part.width])
        return out

    def _tile_pixels(self, index: int) -> np.ndarray:
        if index not in self._cache:
            if len(self._cache) > 32:
                self._cache.pop(next(iter(self._cache)))
            self._cache[index] = self._store.read_tile(index)
        return self._cache[index]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def _paste(out: np.ndarray, frame: Region, part: Region, pixels: np.ndarray) -> None:
    """Copy ``pixels`` (covering ``part``) into ``out`` (covering ``frame``) where they overlap."""
    y0, x0 = max(frame.y, part.y), max(frame.x, part.x)
    y1, x1 = min(frame.y1, part.y1), min(frame.x1, part.x1)
    if y1 <= y0 or x1 <= x0:
        return
    out[y0 - frame.y : y1 - frame.y, x0 - frame.x : x1 - frame.x] = pixels[
        y0 - part.y : y1 - part.y, x0 - part.x : x1 - part.x
    ]


# --------------------------------------------------------------------------------------------- the tasks
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
    min_area_px: int
    split_depth_px: float
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
        """
        shape = block.window.shape
        # +1: an edge to see where the box cuts a nucleus.
        nuclei_box = block.core_in_window.grow(self.nucleus_reach_px + 1).clip(*shape)
        if self.crf is None:
            return nuclei_box, nuclei_box
        return nuclei_box, nuclei_box.grow(self.crf_reach_px).clip(*shape)


@dataclass(frozen=True)
class TissueCrop:
    """The part of the slide's tissue mask under one core; ``factor`` working px per mask px."""

    mask: np.ndarray
    y0: int
    x0: int
    factor: float

    def in_core(self, core: Region) -> np.ndarray:
        rows = np.clip(((core.y + np.arange(core.height)) // self.factor).astype(np.int64) - self.y0, 0, None)
        cols = np.clip(((core.x + np.arange(core.width)) // self.factor).astype(np.int64) - self.x0, 0, None)
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
    reader = WindowReader(job.source, job.scale)
    try:
        images = np.stack([reader.read(block.window) for block in blocks])
    finally:
        reader.close()
    read_s = (time.perf_counter() - clock) / len(blocks)
    with _network_slots(job.network_slots):
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
    :meth:`SlideJob.work_boxes`)."""
    window = block.window
    core = block.core_in_window
    nuclei_box, crf_box = job.work_boxes(block)
    inner = _within(nuclei_box, crf_box)
    clock = time.perf_counter()
    crf = None
    if job.crf is not None:
        crf_slices = crf_box.as_slices()
        crf = PendingCrf(image[crf_slices], probability[crf_slices], job.crf, helpers=job.crf_helpers)
    # Imported here, not with this module, and once the CRF is in its helper: their libraries (scipy,
    # scikit-image) then load while the first tiles are in the network and the CRF, not before the model
    # can start, and not while a core idles.
    from wsiuda.instances import centroids, label_nuclei, owned_nuclei
    from wsiuda.polygons import nucleus_polygons

    refined = crf.result()[inner.as_slices()] if crf is not None else probability[nuclei_box.as_slices()]
    stats["crf_s"], clock = _lap(clock)

    labels = label_nuclei(
        refined, threshold=job.threshold, min_area_px=job.min_area_px, split_depth_px=job.split_depth_px
    )
    ids, points = centroids(labels)
    core_in_labels = _within(core, nuclei_box)
    owned, _ = owned_nuclei(labels, core_in_labels, ids=ids, points=points)
    stats["instances_s"], clock = _lap(clock)

    origin = (window.y + nuclei_box.y, window.x + nuclei_box.x)  # of the labels, in the working frame
    shapes = nucleus_polygons(
        labels,
        owned,
        probability=probability[nuclei_box.as_slices()],
        origin=origin,
        scale=job.scale,
        level0_mpp=job.level0_mpp,
        level0_shape=job.level0_shape,
    )
    features = [
        dump_feature(
            nucleus_feature(
                shape.polygon,
                feature_uuid=feature_id(job.key, *shape.centroid),
                measurements=shape.measurements,
            )
        )
        for shape in shapes
    ]
    stats["polygons_s"], clock = _lap(clock)

    core_probability = probability[core.as_slices()]
    on_tissue = tissue.in_core(block.core) if tissue is not None else np.ones(core.shape, bool)
    stats["nuclei"] = len(features)
    stats["entropy_sum"] = float(binary_entropy(core_probability).sum(dtype=np.float64, where=on_tissue))
    stats["tissue_px"] = float(on_tissue.sum())
    store.write_tile(
        block.index,
        block.core,
        probability=refined[core_in_labels.as_slices()],
        labels=_global_labels(labels, ids, points, origin, core_in_labels, job.shape),
        features=features,
        stats=stats,
    )
    return len(features)


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
) -> np.ndarray:
    """The core's labels renumbered slide-wide: a nucleus's id is 1 + the working-grid index of its centroid.

    ``origin`` places the labels in the working frame and ``core`` is given in the labels' frame. Every
    block that sees a nucleus whole computes the same centroid, so a nucleus spanning cores keeps one id.
    """
    dtype = label_dtype(shape)
    lookup = np.zeros(int(labels.max()) + 1, dtype=dtype)
    if len(ids):
        y = np.clip(np.floor(points[:, 0] + origin[0]), 0, shape[0] - 1).astype(np.uint64)
        x = np.clip(np.floor(points[:, 1] + origin[1]), 0, shape[1] - 1).astype(np.uint64)
        lookup[ids] = (y * np.uint64(shape[1]) + x + np.uint64(1)).astype(dtype)
    return lookup[labels[core.as_slices()]]


def binary_entropy(probability: np.ndarray) -> np.ndarray:
    """Entropy in bits of a foreground probability: 0 where the network is sure, 1 at p = 0.5.

    float32, as the network's probabilities are: twice as fast as float64 on a tile, and a tile's sum
    (taken in float64) moves by about 1e-8 of itself.
    """
    p = np.clip(np.asarray(probability, dtype=np.float32), np.float32(1e-7), np.float32(1 - 1e-7))
    q = 1 - p
    return np.asarray(-(p * np.log2(p) + q * np.log2(q)))


# ---------------------------------------------------------------------------------------------- outputs
@dataclass(frozen=True)
class SlideOutputs:
    geojson: Path
    store: Path
    overlay: Path
    summary: Path


def output_prefix(path: Path) -> Path:
    """The output path without its GeoJSON suffix: the other outputs sit beside it with their own."""
    name = path.name
    for suffix in sorted(GEOJSON_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    return path


def plan_outputs(config: SegmentConfig, sources: Sequence[SourceSpec]) -> tuple[list[SlideOutputs], Path]:
    """Each source's output paths and the config's path; makes the output folder and checks it is writable.

    One file (``-o nuclei.geojson``): ``nuclei.mask.zarr``, ``nuclei.overlay.png``, ``nuclei.summary.json``
    and ``nuclei.segment.yaml`` beside it. A folder: ``<slide>.geojson`` (or ``.geojson.gz`` with gzip),
    ``<slide>.mask.zarr``, ``<slide>.overlay.png``, ``<slide>.summary.json`` per slide and one
    ``segment.yaml``.
    """
    out = Path(config.output)
    if config.single_file:
        if len(sources) != 1:
            raise ConfigError(
                f"-o {out} names one GeoJSON file but {len(sources)} slides were given; pass a folder as -o"
            )
        folder = out.parent
    else:
        folder = out
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out} exists and is not a folder; pass a folder or a .geojson path as -o")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"cannot create the output folder {folder}: {error.strerror}; choose another -o"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable; choose another -o")
    if config.single_file:
        prefix = output_prefix(out)
        return [_outputs(prefix, out)], prefix.with_name(prefix.name + ".segment.yaml")
    stems = [source.stem for source in sources]
    clash = sorted({stem for stem in stems if stems.count(stem) > 1})
    if clash:
        raise ConfigError(f"several inputs are named {', '.join(clash)}; segment them into separate folders")
    suffix = ".geojson.gz" if config.gzip else ".geojson"
    return [_outputs(out / stem, out / f"{stem}{suffix}") for stem in stems], out / "segment.yaml"


def _outputs(prefix: Path, geojson: Path) -> SlideOutputs:
    def beside(suffix: str) -> Path:
        return prefix.with_name(prefix.name + suffix)

    return SlideOutputs(
        geojson=geojson,
        store=beside(".mask.zarr"),
        overlay=beside(".overlay.png"),
        summary=beside(".summary.json"),
    )


# ------------------------------------------------------------------------------------------------ driver
@dataclass(frozen=True)
class SlideResult:
    """How one input fared."""

    source: str
    geojson: str | None = None
    nuclei: int = 0
    tiles: int = 0
    skipped: bool = False
    """Already complete from an earlier run (use --overwrite to redo)."""
    error: str | None = None


@dataclass
class SegmentReport:
    results: list[SlideResult] = field(default_factory=list)

    @property
    def failures(self) -> list[SlideResult]:
        return [result for result in self.results if result.error is not None]


@dataclass
class _Slide:
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


def segment(
    config: SegmentConfig,
    *,
    predictor: Predictor | None = None,
    network: NetworkInfo | None = None,
    progress: bool = False,
) -> SegmentReport:
    """Segment every input of ``config``; a bad input is reported in the result and the batch goes on.

    ``predictor`` replaces the model (a picklable callable where workers are processes) and then needs
    ``network`` to describe it. Errors that stop the whole batch (bad model, unwritable output, bad
    options) raise a :class:`~wsiuda.errors.WsiudaError`.
    """
    if predictor is not None and network is None:
        raise ValueError("a custom predictor needs a NetworkInfo describing it")
    sources = expand_inputs(config.inputs, backend=config.backend, slide_mpp=config.slide_mpp)
    outputs, config_path = plan_outputs(config, sources)
    if predictor is None:
        model_path(config)  # fail fast, before a cluster starts
    try:
        with _runner(config) as run:
            helpers = _crf_helpers(config)
            if helpers and _tasks_run_here(config):
                # Here, not sooner: the helpers then start on the core that idles while torch is imported
                # and the model loaded, not beside this process's other imports or the first tiles.
                start_helpers(helpers)
            if predictor is None:
                predictor, network = resolve_model(config, run)
            assert network is not None
            save_config(config, config_path, command="segment")
            return _segment(config, sources, outputs, predictor, network, run, progress=progress)
    finally:
        shutdown_helper()  # where tasks ran in this process; a worker process's helper ends with it


def _segment(
    config: SegmentConfig,
    sources: list[SourceSpec],
    outputs: list[SlideOutputs],
    predictor: Predictor,
    network: NetworkInfo,
    run: Runner,
    *,
    progress: bool,
) -> SegmentReport:
    working_mpp = config.mpp or network.mpp
    if abs(working_mpp / network.mpp - 1) > 0.1:
        log.warning("working at %.3g µm/px but the model was trained at %.3g µm/px", working_mpp, network.mpp)
    report = SegmentReport()
    from tqdm import tqdm

    bar = tqdm(
        total=0,
        unit="tile",
        desc="segment",
        disable=not progress or not sys.stderr.isatty(),
        file=sys.stderr,
    )

    def tasks() -> Iterator[tuple[Task, tuple[_Slide, list[Block]]]]:
        # Slides are prepared one by one as the runner asks for work, so the workers start on the first
        # slide while the next one's tissue is being found.
        for source, out in zip(sources, outputs, strict=True):
            try:
                prepared = _prepare(source, out, config, network, working_mpp)
            except WsiudaError as error:
                log.error("%s", _naming(source.path, error))
                report.results.append(SlideResult(source.path, error=str(error)))
                continue
            if isinstance(prepared, SlideResult):
                log.info("%s: already segmented into %s (pass --overwrite to redo)", source.path, out.geojson)
                report.results.append(prepared)
                continue
            prepared.remaining = len(prepared.batches)
            if prepared.remaining == 0:  # every tile was done by an earlier run
                report.results.append(_complete(prepared, config))
                continue
            bar.total = (bar.total or 0) + sum(len(blocks) for blocks, _ in prepared.batches)
            bar.refresh()
            for blocks, crops in prepared.batches:
                yield (prepared.job, blocks, crops, predictor), (prepared, blocks)

    with bar:
        for (slide, blocks), outcome in run(process_blocks, tasks()):
            bar.update(len(blocks))
            slide.remaining -= 1
            if isinstance(outcome, WsiudaError):
                slide.failed = slide.failed or str(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
            if slide.remaining == 0:
                report.results.append(_complete(slide, config))
    return report


def _complete(slide: _Slide, config: SegmentConfig) -> SlideResult:
    if slide.failed is not None:
        log.error("%s", _naming(slide.source.path, slide.failed))
        return SlideResult(slide.source.path, error=slide.failed)
    try:
        return _finalize(slide, config)
    except WsiudaError as error:
        log.error("%s", _naming(slide.source.path, error))
        return SlideResult(slide.source.path, error=str(error))


def _naming(path: str, error: object) -> str:
    """The error's message, led by the input's path unless it names it already."""
    message = str(error)
    return message if path in message else f"{path}: {message}"


@contextlib.contextmanager
def _runner(config: SegmentConfig) -> Iterator[Runner]:
    """A :data:`Runner`: in this process (``sync``), or on a dask.distributed cluster."""
    if config.scheduler == SCHEDULER_SYNC:

        def run_here(fn: Callable[..., Any], tasks: Iterable[tuple[Task, Any]]) -> Iterator[tuple[Any, Any]]:
            for arguments, tag in tasks:
                try:
                    yield tag, fn(*arguments)
                except WsiudaError as error:
                    yield tag, error

        yield run_here
        return

    from distributed import as_completed

    with _client(config) as client:

        def run_distributed(
            fn: Callable[..., Any], tasks: Iterable[tuple[Task, Any]]
        ) -> Iterator[tuple[Any, Any]]:
            tags: dict[Any, Any] = {}
            pending = as_completed()
            for arguments, tag in tasks:  # submitted as they come: workers start before the last is made
                future = client.submit(fn, *arguments, pure=False)
                tags[future.key] = tag
                pending.add(future)
            for future in pending:
                try:
                    result = future.result()
                except WsiudaError as error:
                    result = error
                tag = tags.pop(future.key)
                future.release()
                yield tag, result

        yield run_distributed


# What one worker holds at its peak: torch, the model, the windows of its tasks in the network (see
# _threads_per_worker) and its CRF helpers. Workers keep their peak (wsiuda.allocator): a lone 2-task worker
# peaked at 1.35-1.52 GB with the CRF in int8 and 1.87 GB with --no-crf in float32
# (benchmarks/results/segment_throughput.md).
WORKER_MEMORY_BYTES = 2e9


def local_workers(config: SegmentConfig) -> int:
    """Worker processes of the local cluster: --workers, else one per 2 cores as far as memory allows."""
    if config.workers:
        return config.workers
    import psutil

    cores = os.cpu_count() or 1
    by_memory = int(psutil.virtual_memory().available // WORKER_MEMORY_BYTES)
    return max(1, min(cores // 2, by_memory))


def _threads_per_worker(config: SegmentConfig) -> int:
    """Tasks a worker runs at once (0: in this process, one at a time).

    A local worker runs one task per core it owns. In float32 only one of them is in the network at a
    time, on all those cores; in int8 each task's forward pass runs on one thread, side by side (see
    :func:`_network_slots`). The other tasks read, run the CRF and trace nuclei on one thread each. With a
    GPU the CPU steps overlap the network; on a CPU they share the cores with it. pydensecrf holds the
    GIL while it runs, so such a worker runs its CRFs in a helper process (see crf_helper): in the
    worker, a CRF would stall the other task's forward pass. Giving the network only the cores that busy
    tasks leave free was no faster. A worker of an existing cluster keeps one task at a time, as its
    threads are that cluster's to set.
    """
    if config.scheduler == SCHEDULER_SYNC:
        return 0
    if config.scheduler:
        return 1
    return max(1, (os.cpu_count() or 1) // local_workers(config))


def _tasks_run_here(config: SegmentConfig) -> bool:
    """Whether the tiles are processed in this process: a local cluster of one worker runs in it."""
    return config.scheduler == SCHEDULER_SYNC or (not config.scheduler and local_workers(config) == 1)


def _crf_helpers(config: SegmentConfig) -> int:
    """CRF helper processes per worker: one per task where a worker runs tasks side by side, else none."""
    tasks = _threads_per_worker(config)
    return tasks if config.crf and tasks > 1 else 0


@contextlib.contextmanager
def _client(config: SegmentConfig) -> Iterator[Any]:
    """A dask.distributed client: of the cluster at ``config.scheduler``, or of a new local cluster."""
    import dask
    from distributed import Client, LocalCluster

    if config.scheduler:
        try:
            client = Client(config.scheduler, timeout=dask.config.get("distributed.comm.timeouts.connect"))
        except (OSError, TimeoutError) as error:
            raise ConfigError(
                f"cannot reach the Dask scheduler at {config.scheduler} ({error}); check the address"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    workers = local_workers(config)
    threads = _threads_per_worker(config)
    # torch in each worker gets the worker's share of the cores (it reads these when it starts).
    environment = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    # Workers keep the memory they free for their next tiles (wsiuda.allocator), as the console script does.
    environment.update(ALLOCATOR_ENVIRONMENT)
    settings: dict[str, Any] = {
        f"distributed.nanny.pre-spawn-environ.{name}": value for name, value in environment.items()
    }
    settings["distributed.worker.daemon"] = False  # so that a worker may start its CRF helper process
    processes = workers > 1
    if processes:  # a lone worker runs in this process, which is the caller's to set up
        settings["distributed.worker.preload"] = ["wsiuda.pipelines.worker_setup"]
    # The statistical profiler samples every thread's stack each 10 ms, for a dashboard that this cluster
    # does not serve.
    settings["distributed.worker.profile.enabled"] = False
    with dask.config.set(settings):
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            # A lone worker runs in this process: no process to spawn, and torch and the model are loaded
            # once. That saves seconds per run, a real share on a small slide.
            processes=processes,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


# ------------------------------------------------------------------------------------------ per slide
def _prepare(
    source: SourceSpec, outputs: SlideOutputs, config: SegmentConfig, network: NetworkInfo, working_mpp: float
) -> _Slide | SlideResult:
    """Open the source, plan its blocks and create or reopen its mask store."""
    started = time.perf_counter()
    if source.kind == "tiles":
        geometry = _tile_store_geometry(source, working_mpp)
    else:
        geometry = _slide_geometry(source, config, working_mpp)
    tile, shape, scale = geometry.tile, geometry.shape, geometry.scale
    crf = config.crf_params if config.crf else None
    reach = nucleus_reach_px(config.max_nucleus_diameter_um / working_mpp)
    halo = halo_px(
        receptive_field_px=network.receptive_field_px,
        crf_reach_px=crf_reach_px(crf) if crf is not None else 0,
        nucleus_reach_px=reach,
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
        min_area_px=round(config.min_nucleus_area_um2 / working_mpp**2),
        split_depth_px=config.split_depth_um / working_mpp,
        nucleus_reach_px=reach,
        crf_reach_px=crf_reach_px(crf) if crf is not None else 0,
        threads=1 if _threads_per_worker(config) else 0,
        crf_helpers=_crf_helpers(config),
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
            "threads_per_worker": _threads_per_worker(config) or None,
            "batch_size": size,
            "precision": network.precision,
        },
        "working": {
            "mpp": working_mpp,
            "scale": scale,
            "shape": list(shape),
            "tile": tile,
            "halo": halo,
            "window": window_size(tile=tile, halo=halo, align=network.align),
        },
    }
    return _Slide(source, outputs, job, metadata, len(blocks), grouped, started)


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
    from wsiuda.io.store import TileStore

    store = TileStore.open(Path(source.path))
    attrs = store.attrs
    if not store.is_complete:
        raise SlideError(f"{source.path}: the tile store is incomplete; finish it with `wsiuda tile` first")
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
            return None
        return store
    if outputs.geojson.exists() and not config.overwrite:
        raise OutputError(f"{outputs.geojson} already exists; pass --overwrite to replace it")
    return MaskStore.create(
        path, shape=shape, tile=tile, mpp=mpp, metadata={"fingerprint": fresh, "wsiuda_version": __version__}
    )


def _finalize(slide: _Slide, config: SegmentConfig) -> SlideResult:
    """Stream the tiles' features into the GeoJSON, draw the overlay, write the summary, mark complete."""
    from wsiuda.overlay import draw_outlines, write_png

    clock = time.perf_counter()
    store = MaskStore.open(slide.outputs.store)
    done = store.done_tiles()
    indices = [tuple(int(v) for v in index) for index in np.argwhere(done)]  # row-major
    thumbnail, thumb_scale = _thumbnail(slide, config.overlay_size)

    count = 0
    with GeoJsonWriter(slide.outputs.geojson) as writer:

        def rings() -> Iterator[np.ndarray]:
            # Each feature is written as it is drawn: one pass, one feature in memory at a time.
            for index in indices:
                for line in store.tile_features(index):  # type: ignore[arg-type]
                    writer.write_raw(line)
                    yield np.asarray(json.loads(line)["geometry"]["coordinates"][0])

        overlay = draw_outlines(thumbnail, rings(), scale=thumb_scale)
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
    store.mark_complete(nuclei=count)
    log.debug("%s: %d nuclei → %s", slide.source.path, count, slide.outputs.geojson)
    return SlideResult(
        slide.source.path, geojson=str(slide.outputs.geojson), nuclei=count, tiles=slide.planned
    )


def _thumbnail(slide: _Slide, size: int) -> tuple[np.ndarray, float]:
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
            # exact, tile-invariant resampling that a fractional ratio takes is 50x slower and buys a
            # picture nothing.
            downsamples = reader.info.level_downsamples
            step = effective_downsample(downsamples[level_for_scale(downsamples, 1.0 / pixel_size)])
            finer = read_thumbnail(reader, pixel_size=step * max(1, math.floor(pixel_size / step)))
    except (WsiudaError, OSError):
        # A tile store whose slide is gone: outlines on white.
        return np.full((height, width, 3), 255, np.uint8), 1.0 / pixel_size
    return cv2.resize(finer, (width, height), interpolation=cv2.INTER_AREA), 1.0 / pixel_size
