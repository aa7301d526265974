"""`wsiuda tile` as a Dask graph: plan each slide (tissue, grid, store), then read and write its tiles.

Planning runs in the calling process, one slide at a time, and is cheap (a thumbnail). The tile work is a
flat list of tasks, each a batch of one slide's tiles; a task opens the slide and the store by path in its
worker (cached per process), so nothing unpicklable enters the graph. A store is marked complete only when
all its tiles exist. Bad slides are recorded and skipped; the others finish.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from wsiuda._version import __version__
from wsiuda.config import check_finite, config_to_dict, prepare_output_folder, save_config
from wsiuda.errors import ConfigError, OutputError, SlideError, WsiudaError
from wsiuda.geometry import Region
from wsiuda.io import SlideReader, open_slide
from wsiuda.io.dispatch import BACKENDS
from wsiuda.io.store import CODECS, TileStore, is_tile_store
from wsiuda.tiling import (
    effective_downsample,
    level_for_scale,
    read_working_region,
    slide_mpp,
    tile_grid,
    tissue_mask,
    working_scale,
    working_shape,
)

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".dcm"}
    | {".png", ".jpg", ".jpeg", ".bmp"}
)
STORE_SUFFIX = ".zarr"
CONFIG_NAME = "tile_config.yaml"
# The heavy imports of a worker, paid once in the fork server rather than in every worker.
WORKER_PRELOAD = ("numpy", "cv2", "zarr", "imagecodecs", "tifffile", "tiffslide", "openslide", "dask")


@dataclass(frozen=True)
class TileConfig:
    """Everything that decides what ``wsiuda tile`` writes (``workers`` only decides how fast)."""

    mpp: float = 0.25
    slide_mpp: float | None = None
    backend: str = "auto"
    tile: int = 512
    halo: int = 32
    min_tissue: float = 0.1
    codec: str = "jpeg"
    quality: int | None = None
    """Codec level: JPEG quality (default 90) or zstd level (default 3)."""
    tissue_max_side: int = 2048
    workers: int | None = None
    batch: int | None = None
    """Tiles per task; None: runs of 16-256 tiles that shrink towards the end (:func:`batch_sizes`)."""

    def __post_init__(self) -> None:
        check_finite(self)
        problems = []
        if not self.mpp > 0:
            problems.append(f"--mpp must be positive, got {self.mpp}")
        if self.slide_mpp is not None and not self.slide_mpp > 0:
            problems.append(f"--slide-mpp must be positive, got {self.slide_mpp}")
        if self.backend not in BACKENDS:
            problems.append(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not 16 <= self.tile <= 8192:
            problems.append(f"--tile must be 16-8192 px, got {self.tile}")
        if not 0 <= self.halo <= self.tile:
            problems.append(f"--halo must be 0..tile ({self.tile}), got {self.halo}")
        if not 0 <= self.min_tissue <= 1:
            problems.append(f"--min-tissue must be a fraction in [0, 1], got {self.min_tissue}")
        if self.codec not in CODECS:
            problems.append(f"--codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.quality is not None and not 1 <= self.quality <= (100 if self.codec == "jpeg" else 22):
            problems.append(f"--quality {self.quality} is out of range for {self.codec}")
        if self.workers is not None and self.workers < 1:
            problems.append(f"--workers must be >= 1, got {self.workers}")
        if (self.batch is not None and self.batch < 1) or self.tissue_max_side < 16:
            problems.append("batch and tissue_max_side must be positive")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def side(self) -> int:
        """Height and width of each stored tile: the core plus the halo on both sides."""
        return self.tile + 2 * self.halo


@dataclass(frozen=True)
class SlidePlan:
    """What is left to do for one slide; plain data, safe to send to workers."""

    source: str
    store: str
    scale: float
    pending: tuple[int, ...]
    total: int


@dataclass
class SlideResult:
    source: str
    store: str | None = None
    status: str = "failed"  # done | complete | failed
    tiles: int = 0
    written: int = 0
    seconds: float = 0.0
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "failed"


# ------------------------------------------------------------------------------------------------ inputs
def collect_inputs(paths: Iterable[Path]) -> list[Path]:
    """Slides named directly, plus the slide files directly inside each folder (sorted)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
            if not inside:
                raise ConfigError(f"{path}: folder holds no slides ({', '.join(sorted(SLIDE_SUFFIXES))})")
            found.extend(inside)
        else:
            found.append(path)
    return found


def store_path(out_dir: Path, source: Path) -> Path:
    return Path(out_dir) / f"{Path(source).stem}{STORE_SUFFIX}"


# -------------------------------------------------------------------------------------------- planning
def _source_identity(source: Path) -> dict[str, Any]:
    stat = source.stat()
    return {
        "path": str(source.resolve()),
        "size": stat.st_size,
        "mtime": datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc).isoformat(),
        "mtime_ns": stat.st_mtime_ns,
    }


def _fingerprint(identity: dict[str, Any], config: TileConfig, mpp: float) -> dict[str, Any]:
    """What must match for a rerun to resume an existing store instead of refusing it."""
    return {
        "source_size": identity["size"],
        "source_mtime_ns": identity["mtime_ns"],
        "slide_mpp": mpp,
        **{
            key: getattr(config, key)
            for key in ("mpp", "backend", "tile", "halo", "min_tissue", "codec", "quality", "tissue_max_side")
        },
    }


def _metadata(
    reader: SlideReader, identity: dict[str, Any], config: TileConfig, scale: float, regions: list[Region]
) -> dict[str, Any]:
    info = reader.info
    level = level_for_scale(info.level_downsamples, scale)
    shape = working_shape(info.shape, scale)
    mpp = slide_mpp(info)
    return {
        "source": identity,
        "backend": info.backend,
        "vendor": info.vendor,
        "slide_mpp": mpp,
        "slide_mpp_origin": "--slide-mpp"
        if config.slide_mpp is not None
        else ("metadata" if info.mpp is not None else "objective power"),
        "objective_power": info.objective_power,
        "target_mpp": config.mpp,
        "scale": scale,
        "level_read": level,
        "level_downsample": effective_downsample(info.level_downsamples[level]),
        "slide_shape": list(info.shape),
        "working_shape": list(shape),
        "grid": {
            "tile": config.tile,
            "halo": config.halo,
            "rows": -(-shape[0] // config.tile),
            "cols": -(-shape[1] // config.tile),
            "tiles": len(regions),
            "min_tissue": config.min_tissue,
            "order": "row-major; regions/ holds each core tile (y, x, height, width) in the working grid",
        },
        "config": config_to_dict(config),
        "fingerprint": _fingerprint(identity, config, mpp),
        "created_by": f"wsiuda {__version__} tile",
    }


def plan_slide(
    source: Path, out_dir: Path, config: TileConfig, *, overwrite: bool
) -> SlidePlan | SlideResult:
    """Open the slide, find tissue and the grid, and create or check its store.

    Returns a plan of pending tiles, or a finished result when the store is already complete.
    """
    source = Path(source)
    target = store_path(out_dir, source)
    with open_slide(source, backend=config.backend, slide_mpp=config.slide_mpp) as reader:
        scale = working_scale(reader.info, config.mpp)
        identity = _source_identity(source)
        fingerprint = _fingerprint(identity, config, slide_mpp(reader.info))
        if target.exists() and not is_tile_store(target):
            raise OutputError(
                f"{target} exists and is not a wsiuda tile store; remove it or choose another output folder"
            )
        if target.exists() and not overwrite:
            store = TileStore.open(target, writable=True)
            if store.attrs.get("fingerprint") != fingerprint:
                raise OutputError(
                    f"{target} was made from another version of the slide or with other settings; "
                    "pass --overwrite to redo it"
                )
            store.remove_partials()
            if store.is_complete:
                return SlideResult(
                    str(source), str(target), "complete", tiles=len(store), message="already complete"
                )
            pending = tuple(int(i) for i in np.flatnonzero(~store.done()))
            return SlidePlan(str(source), str(target), scale, pending, len(store))
        tissue = tissue_mask(reader, max_side=config.tissue_max_side)
        shape = working_shape(reader.info.shape, scale)
        regions = tile_grid(shape, tile=config.tile, tissue=tissue, scale=scale, min_tissue=config.min_tissue)
        if not regions:
            raise SlideError(
                f"{source}: no tissue found (tissue is {tissue.mask.mean():.1%} of the thumbnail, no tile "
                f"reaches --min-tissue {config.min_tissue}); lower --min-tissue or check the slide"
            )
        store = TileStore.create(
            target,
            regions=regions,
            tile=config.tile,
            halo=config.halo,
            codec=config.codec,
            level=config.quality,
            tissue=tissue.mask,
            tissue_pixel_size=tissue.pixel_size,
            metadata=_metadata(reader, identity, config, scale, regions),
            overwrite=overwrite,
        )
    return SlidePlan(str(source), str(target), scale, tuple(range(len(regions))), len(regions))


# ---------------------------------------------------------------------------------------------- worker
@lru_cache(maxsize=4)
def _cached_reader(source: str, backend: str, slide_mpp: float | None) -> SlideReader:
    """One open reader per slide per worker process (opened by path here, never pickled)."""
    return open_slide(source, backend=backend, slide_mpp=slide_mpp)


@lru_cache(maxsize=4)
def _cached_store(path: str) -> TileStore:
    return TileStore.open(Path(path), writable=True)


def write_tiles(
    source: str, store: str, indices: Sequence[int], config: TileConfig, scale: float
) -> tuple[int, str | None, float]:
    """Read and write some of a slide's tiles; returns (tiles written, error message or None, seconds)."""
    started = time.perf_counter()
    written = 0
    try:
        reader = _cached_reader(source, config.backend, config.slide_mpp)
        tiles = _cached_store(store)
        regions = tiles.core_regions
        for index in indices:
            pixels = read_working_region(reader, regions[index].grow(config.halo), scale=scale)
            tiles.write_tile(index, pixels)
            written += 1
    except (WsiudaError, OSError) as error:
        return written, str(error), time.perf_counter() - started
    return written, None, time.perf_counter() - started


def clear_worker_caches() -> None:
    for cache in (_cached_reader, _cached_store):
        cache.cache_clear()


# -------------------------------------------------------------------------------------------- pipeline
def batch_sizes(pending: int, config: TileConfig) -> list[int]:
    """Tiles per task, in task order: contiguous runs in row-major order, long first, shorter at the end.

    Long runs let a worker's decoded-tile cache serve the halo rows shared with the row above. Each run is
    about a quarter of what is left per worker (16-256 tiles), so the runs shrink as the work runs out and
    the workers finish within a short run of each other.
    """
    if config.batch is not None:
        return [min(config.batch, pending - start) for start in range(0, pending, config.batch)]
    workers = config.workers or os.cpu_count() or 1
    sizes = []
    left = pending
    while left > 0:
        size = min(left, int(min(256, max(16, -(-left // (4 * workers))))))
        sizes.append(size)
        left -= size
    return sizes


def _runs(sizes: list[int]) -> list[slice]:
    """Consecutive slices of the given sizes, from 0."""
    return [slice(end - size, end) for size, end in zip(sizes, itertools.accumulate(sizes), strict=True)]


def _warm_worker(command_pid: int) -> None:
    """Worker initialiser: pay the imports while the parent is still planning, keep OpenCV to one
    thread per worker (the workers already fill the cores), and serve the command (worker_setup)."""
    import cv2

    import wsiuda.pipelines.tile  # noqa: F401
    from wsiuda.pipelines.worker_setup import serve_the_command

    cv2.setNumThreads(1)
    serve_the_command(command_pid)


def start_pool(workers: int) -> Executor | None:
    """Worker processes for several workers; None for one worker, which runs in this process.

    Workers are not forked from this process (zarr's event-loop thread and open slide handles would be
    copied in a broken state) but from a fresh fork server that has imported the pipeline once, so they
    start in a fraction of a spawn's time; where there is no fork server (Windows) they are spawned.
    """
    if workers <= 1:
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context: multiprocessing.context.BaseContext
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # Only third-party modules: the server does not get this process's sys.path (Python 3.11), so it
        # could import a different `wsiuda` (e.g. the source folder when run from a checkout); workers
        # import wsiuda themselves, after receiving the right sys.path.
        context.set_forkserver_preload(list(WORKER_PRELOAD))
        from wsiuda.pipelines.worker_setup import start_fork_server

        start_fork_server()
    else:
        context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_warm_worker, initargs=(os.getpid(),))
    for _ in range(workers):  # start the processes now rather than at the first task
        pool.submit(int)
    return pool


def _run_tasks(
    tasks: list[tuple[int, SlidePlan, tuple[int, ...]]],
    config: TileConfig,
    *,
    pool: Executor | None,
    progress: bool,
) -> list[tuple[int, str | None, float]]:
    import dask
    from dask.callbacks import Callback
    from tqdm import tqdm

    total = sum(len(indices) for _, _, indices in tasks)
    bar = tqdm(total=total, unit="tile", desc="tiling", disable=not progress, dynamic_ncols=True)

    class ProgressCallback(Callback):
        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if isinstance(result, tuple) and len(result) == 3 and isinstance(result[0], int):
                bar.update(result[0])

    graph = [
        dask.delayed(write_tiles, pure=True)(plan.source, plan.store, indices, config, plan.scale)
        for _, plan, indices in tasks
    ]
    # One worker runs in this process (no start-up cost, readers stay warm); several use processes, as
    # slide decoding and zarr's encoding hold the GIL in places. Passing the scheduler as a function also
    # spares dask's probe for a distributed client (a second of imports).
    scheduler: Callable[..., Any]
    if pool is None:
        from dask.local import get_sync

        scheduler = get_sync
    else:
        from dask.multiprocessing import get as get_processes

        # chunksize=1: tasks are already batches of tiles; dask's default groups 6 tasks per dispatch,
        # which leaves one worker idle at the end of a slide.
        scheduler = functools.partial(get_processes, pool=pool, chunksize=1)
    try:
        with ProgressCallback():
            results = dask.compute(*graph, scheduler=scheduler)
    finally:
        bar.close()
        clear_worker_caches()
    return list(results)


def run_tile(
    inputs: Sequence[Path],
    out_dir: Path,
    config: TileConfig,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> list[SlideResult]:
    """Tile each slide of ``inputs`` into ``out_dir/<stem>.zarr``; one result per slide, failures too."""
    prepare_output_folder(out_dir)
    save_config(config, Path(out_dir) / CONFIG_NAME, command="tile")
    sources = collect_inputs(inputs)
    stems: dict[str, Path] = {}
    for source in sources:
        if source.stem in stems and stems[source.stem] != source:
            raise ConfigError(
                f"{source} and {stems[source.stem]} would both write {source.stem}{STORE_SUFFIX}; "
                "tile them into different output folders"
            )
        stems[source.stem] = source

    pool = start_pool(config.workers or os.cpu_count() or 1)
    try:
        return _tile_all(sources, out_dir, config, overwrite=overwrite, progress=progress, pool=pool)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            from wsiuda.pipelines.worker_setup import stop_fork_server

            stop_fork_server()


def _tile_all(
    sources: list[Path],
    out_dir: Path,
    config: TileConfig,
    *,
    overwrite: bool,
    progress: bool,
    pool: Executor | None,
) -> list[SlideResult]:
    results: list[SlideResult] = []
    plans: list[tuple[int, SlidePlan]] = []
    for source in sources:
        started = time.perf_counter()
        try:
            outcome = plan_slide(source, out_dir, config, overwrite=overwrite)
        except WsiudaError as error:
            results.append(SlideResult(str(source), status="failed", message=str(error)))
            continue
        if isinstance(outcome, SlideResult):
            results.append(outcome)
            continue
        planning = time.perf_counter() - started
        results.append(SlideResult(str(source), outcome.store, "done", tiles=outcome.total, seconds=planning))
        plans.append((len(results) - 1, outcome))

    tasks = [
        (slot, plan, plan.pending[run])
        for slot, plan in plans
        for run in _runs(batch_sizes(len(plan.pending), config))
    ]
    outcomes = _run_tasks(tasks, config, pool=pool, progress=progress) if tasks else []
    for (slot, _, _), (written, problem, seconds) in zip(tasks, outcomes, strict=True):
        results[slot].written += written
        results[slot].seconds += seconds
        if problem and not results[slot].message:
            results[slot].status, results[slot].message = "failed", problem

    for slot, plan in plans:
        result = results[slot]
        if not result.failed:
            try:
                store = TileStore.open(Path(plan.store), writable=True)
                store.remove_partials()
                store.mark_complete()
                result.details = {
                    "scale": store.attrs["scale"],
                    "level_read": store.attrs["level_read"],
                    "store_bytes": _folder_bytes(Path(plan.store)),
                    "source_bytes": Path(plan.source).stat().st_size,
                }
            except WsiudaError as error:
                result.status, result.message = "failed", str(error)
    return results


def _folder_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def summary_line(result: SlideResult) -> str:
    """One line per slide for the end-of-run summary."""
    name = Path(result.source).name
    if result.failed:
        # Messages quoted from backends may span lines; the summary keeps one line per slide.
        return f"FAILED  {name}: {' '.join(result.message.split())}"
    if result.status == "complete":
        return f"ok      {name}: {result.tiles} tiles, already complete in {result.store}"
    details = result.details
    ratio = details.get("store_bytes", 0) / max(details.get("source_bytes", 1), 1)
    resumed = result.tiles - result.written
    return (
        f"ok      {name}: {result.tiles} tiles"
        + (f" ({resumed} from an earlier run)" if resumed else "")
        # The workers' seconds summed, not the wall time: with several workers a slide's tiles overlap.
        + f", level {details.get('level_read')} x{details.get('scale', 1):.3g}, "
        f"{result.seconds:.1f} s of work, store {details.get('store_bytes', 0) / 1e6:.1f} MB "
        f"({ratio:.2f}x the slide) -> {result.store}"
    )
