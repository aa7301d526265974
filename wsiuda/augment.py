"""Training-time augmentation on uint8 RGB batches (numpy only).

Geometric: the 8 rot90/flip symmetries of the square (applied alike to images and masks). Stain: each
patch's haematoxylin and eosin concentrations are scaled and shifted in HED space (Ruifrok & Johnston's
colour deconvolution, as in Tellez et al. 2018), then brightness, contrast and saturation are jittered. Stain
augmentation is a strong baseline across H&E labs and is available to every method.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wsiuda.errors import ConfigError

# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB; columns: optical density in R, G, B),
# normalised, as scikit-image uses them.
RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]],
    dtype=np.float64,
)
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)
RGB_FROM_HED = RGB_FROM_HED.astype(np.float32)


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges are half-widths of uniform draws, one draw per patch.

    ``hed_scale`` 0.2 multiplies the H and E concentrations by U(0.8, 1.2); ``hed_shift`` adds U(-s, s) in
    optical-density units (natural log; a typical nucleus has H about 0.2 to 1.0).
    """

    flips: bool = True
    rot90: bool = True
    stain: bool = False
    hed_scale: float = 0.2
    hed_shift: float = 0.03
    brightness: float = 0.1
    contrast: float = 0.2
    saturation: float = 0.2

    def __post_init__(self) -> None:
        for name in ("hed_scale", "hed_shift", "brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ConfigError(f"augmentation {name} must be in [0, 1), got {value}")


def dihedral(array: np.ndarray, k: int) -> np.ndarray:
    """Symmetry ``k`` (0-7) of the square on axes 0 and 1: rot90 ``k % 4`` times, then flip if k >= 4."""
    out = np.rot90(array, k % 4, axes=(0, 1))
    if k >= 4:
        out = out[:, ::-1]
    return out


def random_symmetries(rng: np.random.Generator, count: int, config: AugmentConfig) -> np.ndarray:
    """One symmetry index (0-7) per patch, drawn among those the config allows."""
    rotations = 4 if config.rot90 else 1
    flips = 2 if config.flips else 1
    return rng.integers(0, rotations, count) + 4 * rng.integers(0, flips, count)


def apply_symmetries(batch: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """Apply symmetry ``ks[i]`` to ``batch[i]`` ((N, H, W, ...) with H == W)."""
    return np.stack([dihedral(item, int(k)) for item, k in zip(batch, ks, strict=True)])


def hed_jitter(rng: np.random.Generator, images: np.ndarray, *, scale: float, shift: float) -> np.ndarray:
    """Scale and shift the H and E concentrations of each uint8 RGB patch; DAB is left alone."""
    count = len(images)
    alpha = np.ones((count, 1, 1, 3), dtype=np.float32)
    beta = np.zeros((count, 1, 1, 3), dtype=np.float32)
    alpha[..., :2] = rng.uniform(1 - scale, 1 + scale, (count, 1, 1, 2))
    beta[..., :2] = rng.uniform(-shift, shift, (count, 1, 1, 2))
    density = -np.log((images.astype(np.float32) + 1.0) / 256.0)
    stains = density @ HED_FROM_RGB
    density = (stains * alpha + beta) @ RGB_FROM_HED
    rgb = 256.0 * np.exp(-np.maximum(density, 0.0)) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def colour_jitter(
    rng: np.random.Generator, images: np.ndarray, *, brightness: float, contrast: float, saturation: float
) -> np.ndarray:
    """Per-patch brightness shift, contrast stretch about the patch mean, saturation blend with grey."""
    count = len(images)
    x = images.astype(np.float32) / 255.0
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    s = rng.uniform(1 - saturation, 1 + saturation, (count, 1, 1, 1)).astype(np.float32)
    x = grey[..., None] + s * (x - grey[..., None])
    c = rng.uniform(1 - contrast, 1 + contrast, (count, 1, 1, 1)).astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = mean + c * (x - mean)
    x = x + rng.uniform(-brightness, brightness, (count, 1, 1, 1)).astype(np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def augment(
    rng: np.random.Generator, images: np.ndarray, masks: np.ndarray | None, config: AugmentConfig
) -> tuple[np.ndarray, np.ndarray | None]:
    """Augment a uint8 (N, S, S, 3) batch and its (N, S, S) masks (geometry only) with one draw per patch."""
    ks = random_symmetries(rng, len(images), config)
    images = apply_symmetries(images, ks)
    if masks is not None:
        masks = apply_symmetries(masks, ks)
    if config.stain:
        images = hed_jitter(rng, images, scale=config.hed_scale, shift=config.hed_shift)
        images = colour_jitter(
            rng, images, brightness=config.brightness, contrast=config.contrast, saturation=config.saturation
        )
    return np.ascontiguousarray(images), None if masks is None else np.ascontiguousarray(masks)
