"""Dense CRF refinement of a foreground-probability tile (Krähenbühl & Koltun 2011, via pydensecrf).

Two kernels act on the two labels (background, nucleus): an appearance kernel that pulls pixels of similar
colour within ``theta_alpha`` pixels towards one label (weight ``w1``, colour scale ``theta_beta``), and a
smoothness kernel that removes small isolated regions (weight ``w2``, reach ``theta_gamma``). The defaults
(w1=10, θα=20, θβ=13, w2=3, θγ=3, 5 mean-field iterations) are those of the paper's group.

Kernel widths are in pixels of the grid the CRF runs on (the working mpp), so a 20x slide worked at 40x
keeps the same physical reach. pydensecrf runs the appearance kernel; the smoothness kernel, a plain
Gaussian of the positions, runs as an OpenCV Gaussian filter between its mean-field steps (see ``_crf``).
Two faster modes trade a little agreement for speed: ``downsample`` runs the CRF on a coarser grid (kernel
widths scaled to keep the same physical reach) and ``uncertain_margin`` runs it only on blocks that hold
pixels whose probability is within the margin of 0.5, keeping the network's probability elsewhere. Each
block is read with the kernel reach around it, and on tissue nearly every block holds such pixels: on
every slide of benchmarks/results/segment_throughput.md, the tissue islands included, that mode was
slower than the full CRF. ``wsiuda segment`` and ``wsiuda evaluate`` run
:data:`DEFAULT_CRF`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np

from wsiuda.config import check_finite
from wsiuda.errors import ConfigError

# A Gaussian kernel is cut where it has fallen below exp(-truncate²/2) of its peak (1.1% at 3σ).
KERNEL_TRUNCATE = 3.0
# Probabilities are kept off 0 and 1 so that the unary energy -log p stays finite.
_EPS = 1e-5


@dataclass(frozen=True)
class CrfParams:
    """Parameters of the dense CRF; widths are in pixels of the grid the probability map is on."""

    w1: float = 10.0
    """Weight of the appearance (bilateral) kernel."""
    theta_alpha: float = 20.0
    """Spatial width of the appearance kernel, px."""
    theta_beta: float = 13.0
    """Colour width of the appearance kernel, in 0-255 RGB units."""
    w2: float = 3.0
    """Weight of the smoothness (Gaussian) kernel."""
    theta_gamma: float = 3.0
    """Spatial width of the smoothness kernel, px."""
    iterations: int = 5
    """Mean-field iterations."""
    downsample: float = 1.0
    """Run the CRF on a grid this many times coarser (1: full resolution; need not be a whole number)."""
    uncertain_margin: float | None = None
    """If set, refine only blocks holding pixels with |p - 0.5| < margin; elsewhere keep p."""
    block: int = 128
    """Block size in px for ``uncertain_margin``."""

    def __post_init__(self) -> None:
        check_finite(self)
        for name in ("w1", "w2"):
            if getattr(self, name) < 0:
                raise ConfigError(f"CRF {name} must be >= 0, got {getattr(self, name)}")
        for name in ("theta_alpha", "theta_beta", "theta_gamma"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"CRF {name} must be > 0, got {getattr(self, name)}")
        if self.iterations < 1:
            raise ConfigError(f"CRF iterations must be >= 1, got {self.iterations}")
        if self.downsample < 1:
            raise ConfigError(f"CRF downsample must be >= 1, got {self.downsample}")
        if self.uncertain_margin is not None and not 0 < self.uncertain_margin <= 0.5:
            raise ConfigError(f"CRF uncertain_margin must be in (0, 0.5], got {self.uncertain_margin}")
        if self.block < 8:
            raise ConfigError(f"CRF block must be >= 8 px, got {self.block}")


DEFAULT_CRF = CrfParams(w1=1.0, downsample=2.5, iterations=2)
"""The CRF that segment and evaluate run: the paper's kernels with the appearance weight chosen on the
default model's source validation images (benchmarks/results/crf_tuning.md; the paper group's w1=10 lost 0.046
Dice there), on a grid 2.5 times coarser than the working grid and with 2 mean-field iterations. With malloc
set to reuse freed memory (wsiuda.allocator) the int8 forward pass of a CMU-1-Small-Region tile takes 330 ms
on a 2-core EPYC with AVX-512 VNNI; this CRF takes 0.45x as long, where half resolution with 2 iterations
took 0.63x. On the 14 MoNuSeg 2018 test images it loses 0.0038 Dice against the full CRF (full resolution,
5 iterations; half resolution with 2 iterations lost 0.0025) (benchmarks/results/segment_throughput.md)."""


def crf_reach_px(params: CrfParams) -> int:
    """How far (px) the CRF lets one pixel's value influence another: the widest kernel, truncated.

    This is the CRF's share of a tile's halo: beyond it a tile's CRF result no longer depends on what lies
    outside the tile.
    """
    return math.ceil(KERNEL_TRUNCATE * max(params.theta_alpha, params.theta_gamma))


def crf_grid_period(params: CrfParams) -> int:
    """The fewest pixels that span a whole number of pixels of the grid the CRF runs on (5 for a
    downsample of 2.5; 1 at full resolution or in the uncertain-blocks mode).

    Crops whose edges lie on multiples of it in one frame are resampled onto one shared CRF grid: where
    crops overlap, the CRF sees the same coarse pixels and refines them alike.
    """
    if params.downsample == 1 or params.uncertain_margin is not None:
        return 1
    return Fraction(params.downsample).limit_denominator(1000).numerator


def dense_crf(image: np.ndarray, probability: np.ndarray, params: CrfParams) -> np.ndarray:
    """Refine a foreground probability map with a dense CRF.

    ``image`` is uint8 RGB (H, W, 3) and ``probability`` float (H, W) in [0, 1] on the same grid. Returns the
    CRF's foreground marginal, float32 (H, W).
    """
    probability = _checked(image, probability)
    if params.uncertain_margin is None:
        return _crf_resampled(image, probability, params)

    # Refine only blocks holding uncertain pixels, each read with a margin of the kernel reach so that its
    # result does not depend on the cut; confident blocks keep the network's probability.
    out = probability.copy()
    uncertain = np.abs(probability - 0.5) < params.uncertain_margin
    reach = crf_reach_px(params)
    height, width = probability.shape
    step = params.block
    for y in range(0, height, step):
        for x in range(0, width, step):
            if not uncertain[y : y + step, x : x + step].any():
                continue
            y0, x0 = max(y - reach, 0), max(x - reach, 0)
            y1, x1 = min(y + step + reach, height), min(x + step + reach, width)
            refined = _crf_resampled(image[y0:y1, x0:x1], probability[y0:y1, x0:x1], params)
            out[y : y + step, x : x + step] = refined[y - y0 : y - y0 + step, x - x0 : x - x0 + step]
    return out


def to_crf_grid(
    image: np.ndarray, probability: np.ndarray, params: CrfParams
) -> tuple[np.ndarray, np.ndarray]:
    """The image and probability on the grid the CRF runs on (``params.downsample`` times coarser).

    With :func:`crf_on_grid` and :func:`from_crf_grid` this is :func:`dense_crf` in three steps (for the
    whole-map modes, not ``uncertain_margin``), so that a caller can hand only the coarse grid to
    another process.
    """
    return _to_grid(image, _checked(image, probability), params)


def _to_grid(image: np.ndarray, probability: np.ndarray, params: CrfParams) -> tuple[np.ndarray, np.ndarray]:
    factor = params.downsample
    if factor == 1:
        return image, probability
    height, width = probability.shape
    small = (max(round(width / factor), 1), max(round(height / factor), 1))
    image_small = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
    return image_small, np.asarray(cv2.resize(probability, small, interpolation=cv2.INTER_AREA))


def crf_on_grid(image: np.ndarray, probability: np.ndarray, params: CrfParams) -> np.ndarray:
    """The CRF on the output of :func:`to_crf_grid`, kernel widths scaled to that grid."""
    return _crf(image, probability, params, spatial_scale=1.0 / params.downsample)


def from_crf_grid(refined: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The CRF's result of :func:`crf_on_grid` back on the probability map's grid of ``shape`` (H, W)."""
    if refined.shape == shape:
        return refined
    height, width = shape
    return np.asarray(cv2.resize(refined, (width, height), interpolation=cv2.INTER_LINEAR), dtype=np.float32)


def _checked(image: np.ndarray, probability: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if probability.shape != image.shape[:2]:
        raise ValueError(f"probability {probability.shape} does not match image {image.shape[:2]}")
    return np.asarray(probability, dtype=np.float32)


def _crf_resampled(image: np.ndarray, probability: np.ndarray, params: CrfParams) -> np.ndarray:
    """The CRF of inputs that :func:`dense_crf` has checked."""
    coarse = _to_grid(image, probability, params)
    return from_crf_grid(crf_on_grid(*coarse, params), probability.shape)


def _crf(
    image: np.ndarray, probability: np.ndarray, params: CrfParams, *, spatial_scale: float = 1.0
) -> np.ndarray:
    import pydensecrf.densecrf as dcrf  # a compiled extension, loaded only where the CRF runs

    height, width = probability.shape
    foreground = np.clip(probability, _EPS, 1.0 - _EPS)
    unary = -np.log(np.stack([1.0 - foreground, foreground]).reshape(2, -1)).astype(np.float32)
    # pydensecrf runs the appearance kernel on its permutohedral lattice. The smoothness kernel is a plain
    # Gaussian of the positions, so it is applied here as an exact Gaussian filter between pydensecrf's
    # mean-field steps, folded into the unary of the next step: a lattice for it took about a fifth of a
    # tile's CRF to build (timed by hand) and filtered more slowly than OpenCV. Its message is pydensecrf's
    # for that kernel (normalised, self included, Potts: w2 times the filtered marginals of the same label)
    # without the lattice's approximation (tests/test_crf.py compares the two).
    crf = dcrf.DenseCRF2D(width, height, 2)
    crf.addPairwiseBilateral(
        sxy=params.theta_alpha * spatial_scale,
        srgb=params.theta_beta,
        rgbim=np.ascontiguousarray(image),
        compat=params.w1,
    )
    crf.setUnaryEnergy(unary)
    marginals, scratch, messages = crf.startInference()
    sigma = params.theta_gamma * spatial_scale
    for _ in range(params.iterations):
        current = np.asarray(marginals, dtype=np.float32).reshape(2, height, width)
        smoothed = np.stack(
            [cv2.GaussianBlur(label, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) for label in current]
        )
        crf.setUnaryEnergy(unary - np.float32(params.w2) * smoothed.reshape(2, -1))
        crf.stepInference(marginals, scratch, messages)
    result = np.asarray(marginals, dtype=np.float32)[1].reshape(height, width)
    return np.ascontiguousarray(result)
