"""Augmentation: geometry moves images and masks together; stain jitter changes colour, not shape."""

from __future__ import annotations

import numpy as np
import pytest

from wsiuda.augment import AugmentConfig, augment, colour_jitter, hed_jitter, random_symmetries
from wsiuda.errors import ConfigError


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    masks = (images[..., 0] > 128).astype(np.uint8)
    return images, masks


def test_geometry_keeps_masks_aligned_with_images() -> None:
    images, masks = batch()
    out, out_masks = augment(np.random.default_rng(1), images, masks, AugmentConfig())
    assert out_masks is not None and out.shape == images.shape and out_masks.shape == masks.shape
    np.testing.assert_array_equal(out_masks, (out[..., 0] > 128).astype(np.uint8))
    assert not np.array_equal(out, images), "no patch was transformed"
    for before, after in zip(images, out, strict=True):
        assert sorted(before.reshape(-1, 3).tolist()) == sorted(after.reshape(-1, 3).tolist())


def test_symmetries_follow_the_config() -> None:
    rng = np.random.default_rng(0)
    assert set(random_symmetries(rng, 200, AugmentConfig()).tolist()) == set(range(8))
    assert set(random_symmetries(rng, 200, AugmentConfig(flips=False)).tolist()) == {0, 1, 2, 3}
    assert set(random_symmetries(rng, 200, AugmentConfig(rot90=False)).tolist()) == {0, 4}
    assert set(random_symmetries(rng, 50, AugmentConfig(flips=False, rot90=False)).tolist()) == {0}


def test_stain_jitter_is_identity_at_zero_and_changes_colour_otherwise() -> None:
    images, _ = batch()
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(hed_jitter(rng, images, scale=0, shift=0), images)
    np.testing.assert_array_equal(colour_jitter(rng, images, brightness=0, contrast=0, saturation=0), images)
    jittered = hed_jitter(rng, images, scale=0.3, shift=0.05)
    assert jittered.dtype == np.uint8 and jittered.shape == images.shape
    assert np.abs(jittered.astype(int) - images).mean() > 1


def test_stain_augmentation_leaves_masks_alone_and_is_seeded() -> None:
    images, masks = batch()
    config = AugmentConfig(stain=True, flips=False, rot90=False)
    first, first_masks = augment(np.random.default_rng(5), images, masks, config)
    second, _ = augment(np.random.default_rng(5), images, masks, config)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first_masks, masks)
    assert not np.array_equal(first, images)


def test_bad_ranges_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="hed_scale"):
        AugmentConfig(hed_scale=1.5)
