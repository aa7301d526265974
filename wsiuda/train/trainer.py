"""One training iteration for every method: the S step (segmentation, and R with it) then the D step.

Which terms run is decided by the config's weights alone, so a method is only a preset of those weights.
Gradients go where they should: during the S step D's parameters are frozen (the adversarial term moves S
only) and D's optimizer is not stepped; the D step sees detached predictions, so it cannot move S.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from wsiuda.models import build_discriminator, build_unet, images_to_tensor
from wsiuda.models.unet import channels_last
from wsiuda.train import losses
from wsiuda.train.config import AdaptConfig


@dataclass(frozen=True, eq=False)
class Batch:
    """One iteration's data as sampled (uint8 numpy; the trainer moves it to the device)."""

    source_images: np.ndarray
    source_masks: np.ndarray
    target_images: np.ndarray | None = None
    target_symmetries: tuple[int, ...] | None = None
    source_symmetries: tuple[int, ...] | None = None
    pseudo_images: np.ndarray | None = None
    pseudo_labels: np.ndarray | None = None
    """int8, 1 foreground, 0 background, -1 ignored (not confident enough)."""


class NonFiniteLoss(Exception):
    """A loss term became NaN or infinite; the loop turns it into a TrainingError."""

    def __init__(self, terms: dict[str, float]) -> None:
        bad = {name: value for name, value in terms.items() if not np.isfinite(value)}
        super().__init__(", ".join(f"{name}={value}" for name, value in bad.items()))
        self.terms = bad


class Trainer:
    """S, and D and R where the config weighs their terms, with their Adam optimizers."""

    def __init__(
        self, config: AdaptConfig, segmenter: nn.Module, normalisation: dict[str, Any], device: torch.device
    ) -> None:
        self.config = config
        self.device = device
        self.normalisation = normalisation
        self.s = channels_last(segmenter.to(device))
        self.opt_s = torch.optim.Adam(self.s.parameters(), lr=config.lr_s)
        self.d: nn.Module | None = None
        self.opt_d: torch.optim.Optimizer | None = None
        if config.uses_discriminator:
            self.d = channels_last(build_discriminator(width=config.d_width).to(device))
            betas = tuple(config.d_betas or (0.9, 0.999))
            self.opt_d = torch.optim.Adam(self.d.parameters(), lr=float(config.lr_d or 1e-3), betas=betas)  # type: ignore[arg-type]
        self.r: nn.Module | None = None
        self.opt_r: torch.optim.Optimizer | None = None
        if config.uses_reconstructor:
            r = build_unet(in_channels=1, out_channels=3, width=config.r_width, depth=min(config.depth, 3))
            self.r = channels_last(r.to(device))
            self.opt_r = torch.optim.Adam(self.r.parameters(), lr=config.lr_r)
        self.amp = config.amp and device.type == "cuda"

    # --------------------------------------------------------------------------------------------- helpers
    def images(self, pixels: np.ndarray) -> torch.Tensor:
        return images_to_tensor(
            torch.from_numpy(pixels).to(self.device, non_blocking=True), self.normalisation
        )

    def labels(self, pixels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(pixels).to(self.device).float().unsqueeze(1)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def train_mode(self) -> None:
        for net in (self.s, self.d, self.r):
            if net is not None:
                net.train()

    # ------------------------------------------------------------------------------------------------ steps
    def segmenter_step(
        self, batch: Batch, *, epoch: float
    ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor | None]:
        """Update S (and R) on every weighted term; returns the logged terms and the detached predictions."""
        c = self.config
        self.train_mode()
        if self.d is not None:
            self.d.requires_grad_(False)
        terms: dict[str, torch.Tensor] = {}
        with self.autocast():
            xs, ys = self.images(batch.source_images), self.labels(batch.source_masks)
            logits_s = self.s(xs)
            ps = torch.sigmoid(logits_s.float())
            terms["dice"] = losses.dice_loss(ps, ys)
            if c.bce_weight > 0:
                terms["bce"] = c.bce_weight * losses.bce_loss(logits_s, ys)
            em_weight = float(c.em_weight or 0)
            if em_weight > 0 and c.em_on in ("source", "both"):
                terms["em_source"] = em_weight * losses.binary_entropy(logits_s)
            ramp = losses.ramp_weight(epoch, k=float(c.consistency_k or 0), peak=c.consistency_peak)
            if ramp > 0 and c.consistency_on in ("source", "both") and batch.source_symmetries is not None:
                terms["consistency_source"] = ramp * self.consistency(xs, ps, batch.source_symmetries)
            pt = None
            if batch.target_images is not None:
                xt = self.images(batch.target_images)
                logits_t = self.s(xt)
                pt = torch.sigmoid(logits_t.float())
                if em_weight > 0 and c.em_on in ("target", "both"):
                    terms["em_target"] = em_weight * losses.binary_entropy(logits_t)
                if (
                    ramp > 0
                    and c.consistency_on in ("target", "both")
                    and batch.target_symmetries is not None
                ):
                    terms["consistency"] = ramp * self.consistency(xt, pt, batch.target_symmetries)
                if self.d is not None:
                    terms["adv"] = float(c.lambda_adv or 0) * losses.adversarial_loss(self.d(pt))
                if self.r is not None:
                    terms["recons"] = float(c.lambda_recons or 0) * losses.reconstruction_loss(self.r(pt), xt)
            if batch.pseudo_images is not None and batch.pseudo_labels is not None:
                xp = self.images(batch.pseudo_images)
                labels = torch.from_numpy(batch.pseudo_labels).to(self.device).unsqueeze(1)
                keep, target = (labels >= 0).float(), labels.clamp_min(0).float()
                logits_p = self.s(xp)
                pseudo = losses.dice_loss(torch.sigmoid(logits_p.float()), target, weight=keep)
                pseudo = pseudo + losses.bce_loss(logits_p, target, weight=keep)
                terms["pseudo"] = float(c.cbst_weight or 0) * pseudo
        total = torch.stack(list(terms.values())).sum()
        values = dict(zip([*terms, "total"], torch.stack([*terms.values(), total]).tolist(), strict=True))
        if not np.isfinite(values["total"]):
            raise NonFiniteLoss(values)
        self.opt_s.zero_grad(set_to_none=True)
        if self.opt_r is not None:
            self.opt_r.zero_grad(set_to_none=True)
        total.backward()
        self.opt_s.step()
        if self.opt_r is not None:
            self.opt_r.step()
        if self.d is not None:
            self.d.requires_grad_(True)
        values["lambda_consistency"] = ramp
        return values, ps.detach(), None if pt is None else pt.detach()

    def consistency(
        self, x: torch.Tensor, probabilities: torch.Tensor, symmetries: tuple[int, ...]
    ) -> torch.Tensor:
        """MSE between S(T(x)) and T(S(x)) with one symmetry per sample; the teacher side is detached."""
        ks = list(symmetries)
        teacher = losses.dihedral_batch(probabilities.detach(), ks)
        transformed = losses.dihedral_batch(x, ks).contiguous(memory_format=torch.channels_last)
        student = torch.sigmoid(self.s(transformed).float())
        return losses.consistency_loss(student, teacher)

    def discriminator_step(self, source: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Update D on detached source (label 1) and target (label 0) probability maps."""
        assert self.d is not None and self.opt_d is not None
        self.d.train()
        with self.autocast():
            source_scores = self.d(source.detach().contiguous(memory_format=torch.channels_last))
            target_scores = self.d(target.detach().contiguous(memory_format=torch.channels_last))
            loss = losses.discriminator_loss(source_scores, target_scores)
        accuracy = losses.discriminator_accuracy(source_scores, target_scores)
        values = dict(zip(["d_loss", "d_acc"], torch.stack([loss.detach(), accuracy]).tolist(), strict=True))
        if not np.isfinite(values["d_loss"]):
            raise NonFiniteLoss(values)
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return values

    def step(self, batch: Batch, *, epoch: float) -> dict[str, float]:
        values, ps, pt = self.segmenter_step(batch, epoch=epoch)
        if self.d is not None and pt is not None:
            values |= self.discriminator_step(ps, pt)
        return values

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"s": self.s.state_dict(), "opt_s": self.opt_s.state_dict()}
        for name in ("d", "r", "opt_d", "opt_r"):
            part = getattr(self, name)
            if part is not None:
                state[name] = part.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("s", "opt_s", "d", "r", "opt_d", "opt_r"):
            part = getattr(self, name)
            if part is not None:
                part.load_state_dict(state[name])
        # An optimizer's state carries the learning rate it was saved with; the resumed run's config wins,
        # so a run can be continued at a lower rate.
        for optimizer, lr in ((self.opt_s, self.config.lr_s), (self.opt_d, self.config.lr_d or 1e-3),
                              (self.opt_r, self.config.lr_r)):  # fmt: skip
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] = float(lr)
