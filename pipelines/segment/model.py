"""The network as the pipeline sees it: described once by a worker, loaded once per worker process.

The driver never imports torch: a worker loads the model file, describes it (:func:`describe_model`) and
keeps it for its tiles; tasks reach it through a picklable :class:`ModelPredictor`.
"""

from __future__ import annotations

import hashlib
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from wsiuda.errors import MODEL_FILE_FIX, ModelError
from wsiuda.pipelines.segment.cluster import Runner, threads_per_worker
from wsiuda.pipelines.segment.config import SegmentConfig

Predictor = Callable[[np.ndarray], np.ndarray]
"""uint8 RGB (N, H, W, 3) at the working mpp → float32 (N, H, W) foreground probabilities."""


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
    """Tasks of one worker that may be in the network at once (see forward_slots)."""


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


def forward_slots(count: int) -> threading.Semaphore:
    """The tasks of this process that may be in the network at once.

    In float32 that is one, on all the worker's cores: two float32 passes side by side on one thread each
    are faster (1.10x) but take a process past 2 GiB (2214 MiB). int8 activations are a quarter the
    size: side by side they gave 1.17x the throughput of one at a time on both threads, at 873 MiB
    (default model, 1472 px windows, 2 cores; benchmarks/results/forward_arrangements.md).
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
    if path.is_dir():
        raise ModelError(f"-m {path} is a folder, not a model file; {MODEL_FILE_FIX}")
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist; {MODEL_FILE_FIX}")
    if not zipfile.is_zipfile(path):
        raise ModelError(
            f"{path} is not a readable model file (not a torch archive written by wsiuda); {MODEL_FILE_FIX}"
        )
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
    tasks = threads_per_worker(config)
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
