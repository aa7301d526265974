"""The one config of ``wsiuda segment``: every choice of a run, saved as YAML beside its outputs."""

from __future__ import annotations

from dataclasses import dataclass

from wsiuda.config import check_finite, check_precision
from wsiuda.crf import DEFAULT_CRF, CrfParams
from wsiuda.errors import ConfigError
from wsiuda.io.dispatch import BACKENDS
from wsiuda.io.geojson import GEOJSON_SUFFIXES

SCHEDULER_SYNC = "sync"

NUCLEI_MPP = 0.5
"""Default grid of the nuclei steps, µm/px. The probability is averaged over 2x2 working pixels at 0.25
µm/px: the split then scores a higher AJI than on the working grid, with the CRF and without it, in less
than half the time (benchmarks/results/nuclei_steps.md). A nucleus of 6 µm spans 12 px on it."""


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
    """Tiles per batch; None: 1 on a CPU (a process passing one 1024 tile's window through the float32
    network peaked at 1255 MiB, benchmarks/results/forward_arrangements.md), 4 on a GPU."""
    workers: int | None = None
    """Local workers; None: one per 2 cores, as far as memory allows (see cluster.local_workers). Several
    run as processes; a lone worker runs in this process."""
    scheduler: str | None = None
    """None: a local cluster; 'sync': in this process, a batch at a time; else a dask.distributed address."""
    overwrite: bool = False
    threshold: float = 0.5
    min_nucleus_area_um2: float = 6.0
    max_nucleus_diameter_um: float = 16.0
    """Largest nucleus expected: sets the part of the halo that lets a nucleus be seen whole."""
    split_depth_um: float = 0.5
    """Touching nuclei split where the neck is at least this much narrower (half-width) than the nuclei."""
    nuclei_mpp: float | None = None
    """Grid on which nuclei are labelled, split and outlined, µm/px: a whole multiple of the working mpp.
    None: the multiple nearest :data:`NUCLEI_MPP`."""
    min_tissue: float = 0.05
    """Tiles with less tissue than this fraction are skipped (0 keeps every tile)."""
    gzip: bool = False
    """In folder mode, write .geojson.gz files."""
    overlay_size: int = 2048

    def __post_init__(self) -> None:
        check_finite(self)
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
        if self.nuclei_mpp is not None and not self.nuclei_mpp > 0:
            raise ConfigError(f"--nuclei-mpp must be positive, got {self.nuclei_mpp}")
        if self.min_nucleus_area_um2 < 0 or self.split_depth_um < 0:
            raise ConfigError("nucleus area and split depth must be non-negative")
        check_precision(self.precision)
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown --backend {self.backend!r} (one of {', '.join(BACKENDS)})")
        if isinstance(self.crf_params, dict):  # rebuilt from YAML
            object.__setattr__(self, "crf_params", CrfParams(**self.crf_params))

    def nuclei_factor(self, working_mpp: float) -> int:
        """Working px per px of the nuclei grid (see :attr:`nuclei_mpp`)."""
        if self.nuclei_mpp is None:
            return max(1, round(NUCLEI_MPP / working_mpp))
        ratio = self.nuclei_mpp / working_mpp
        factor = round(ratio)
        if factor < 1 or abs(ratio - factor) > 1e-3 * ratio:
            raise ConfigError(
                f"--nuclei-mpp {self.nuclei_mpp:g} is not a whole multiple of the working {working_mpp:g} "
                f"µm/px; pass a multiple such as {working_mpp * max(factor, 1):g}, or leave it out"
            )
        return factor

    @property
    def single_file(self) -> bool:
        """Whether ``output`` names one GeoJSON file rather than a folder."""
        return self.output.lower().endswith(GEOJSON_SUFFIXES)
