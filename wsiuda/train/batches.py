"""Sampling each iteration's batch, one epoch at a time, in a background thread.

Every epoch draws from its own generator, ``numpy.random.default_rng([seed, epoch])``: the batches of epoch
E are the same whether the run went through without a stop or was resumed at E, and the checkpoint need not
carry a generator state. One thread samples the next batch while the network trains on this one; it is the
generator's only user, so the order of draws never changes.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from wsiuda.augment import AugmentConfig, augment
from wsiuda.data import LabelledSet, TargetPool, sample_labelled
from wsiuda.train.config import AdaptConfig
from wsiuda.train.trainer import Batch


@dataclass(frozen=True, eq=False)
class PseudoPool:
    """Target patches with their class-balanced pseudo-labels, fixed for one self-training round."""

    images: np.ndarray
    labels: np.ndarray
    round_index: int
    portion: float


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


def sample_targets(
    rng: np.random.Generator, pools: Sequence[TargetPool], *, count: int, size: int
) -> np.ndarray:
    """``count`` patches, each from a target source chosen uniformly."""
    choices = rng.integers(len(pools), size=count)
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for index, pool in enumerate(pools):
        picked = np.flatnonzero(choices == index)
        if len(picked):
            out[picked] = pool.sample(rng, count=len(picked), size=size)
    return out


class BatchSampler:
    def __init__(
        self, config: AdaptConfig, sources: Sequence[LabelledSet], targets: Sequence[TargetPool]
    ) -> None:
        self.config = config
        self.sources = list(sources)
        self.targets = list(targets)
        self.augment = AugmentConfig(stain=config.stain_aug)
        c = config
        self.needs_target = bool(targets) and (
            c.uses_discriminator
            or c.uses_reconstructor
            or (float(c.em_weight or 0) > 0 and c.em_on != "source")
            or (float(c.consistency_k or 0) > 0 and c.consistency_on != "source")
        )

    def batch(self, rng: np.random.Generator, pseudo: PseudoPool | None) -> Batch:
        c = self.config
        size, count = c.patch_size, c.batch_size
        raw_images, raw_masks = sample_labelled(rng, self.sources, count=count, size=size)
        images, masks = augment(rng, raw_images, raw_masks, self.augment)
        target: np.ndarray | None = None
        target_ks: tuple[int, ...] | None = None
        source_ks: tuple[int, ...] | None = None
        if self.needs_target:
            target, _ = augment(
                rng, sample_targets(rng, self.targets, count=count, size=size), None, self.augment
            )
        consistency = float(c.consistency_k or 0) > 0
        if consistency:
            # Non-identity symmetries only: the identity contributes a zero term.
            target_ks = tuple(int(k) for k in rng.integers(1, 8, count)) if target is not None else None
            source_ks = (
                tuple(int(k) for k in rng.integers(1, 8, count)) if c.consistency_on != "target" else None
            )
        pseudo_images: np.ndarray | None = None
        pseudo_labels: np.ndarray | None = None
        if pseudo is not None:
            picked = rng.integers(len(pseudo.images), size=count)
            pseudo_images, pseudo_labels = augment(
                rng, pseudo.images[picked], pseudo.labels[picked], self.augment
            )
        assert masks is not None
        return Batch(images, masks, target, target_ks, source_ks, pseudo_images, pseudo_labels)

    def epoch(
        self, rng: np.random.Generator, *, iterations: int, pseudo: PseudoPool | None
    ) -> Generator[Batch, None, None]:
        """The epoch's batches, each sampled in the background while the previous one trains."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsiuda-batches") as executor:
            future = executor.submit(self.batch, rng, pseudo)
            for index in range(iterations):
                batch = future.result()
                if index + 1 < iterations:
                    future = executor.submit(self.batch, rng, pseudo)
                yield batch
