"""The loss terms of Li et al. (2021) and its baselines, as small pure functions of tensors.

Networks return logits; functions that need probabilities say so. Every reduction is a mean over pixels
(and the batch), so the weights do not depend on the patch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1.0
"""Added to numerator and denominator (as CellSegUDA's code does): a patch with no nuclei and no prediction
scores a loss of 0, not 0/0, and the gradient stays finite."""


def dice_loss(
    probabilities: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    smooth: float = DICE_SMOOTH,
) -> torch.Tensor:
    """1 - (2 sum(Y * P) + s) / (sum(Y) + sum(P) + s), summed over the whole batch (Eq. 1).

    ``weight`` (0/1 of the same shape) leaves pixels out, e.g. the ignored pixels of pseudo-labels.
    """
    p, y = probabilities.float().flatten(), target.float().flatten()
    if weight is not None:
        w = weight.float().flatten()
        p, y = p * w, y * w
    return 1.0 - (2.0 * (p * y).sum() + smooth) / (p.sum() + y.sum() + smooth)


def bce_loss(
    logits: torch.Tensor, target: torch.Tensor, *, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over the pixels ``weight`` keeps (all by default)."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    if weight is None:
        return losses.mean()
    w = weight.float()
    return (losses * w).sum() / w.sum().clamp_min(1.0)


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of -(p log p + (1 - p) log(1 - p)), p = sigmoid(logits) (Eq. 2 with both terms).

    Computed from logits with log-sigmoid, so saturated predictions give 0 and not NaN. Its maximum is log 2.
    """
    z = logits.float()
    p = torch.sigmoid(z)
    return -(p * F.logsigmoid(z) + (1.0 - p) * F.logsigmoid(-z)).mean()


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetry ``k`` (0-7) of the square on the last two axes: rot90 ``k % 4`` times, then a flip if k >= 4.

    The same convention as :func:`wsiuda.augment.dihedral` on (H, W, ...) arrays.
    """
    out = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(out, dims=(-1,)) if k >= 4 else out


def dihedral_batch(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Apply symmetry ``ks[i]`` to sample ``x[i]`` of an (N, C, H, W) batch with H == W."""
    return torch.stack([dihedral(item, k) for item, k in zip(x, ks, strict=True)])


def consistency_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between S(T(x)) and T(S(x)), both probabilities (Eq. 3).

    The caller detaches the teacher side T(S(x)): the teacher shares the student's weights (a Pi-model, not
    a mean teacher), and only the transformed branch learns to agree with it, which keeps the term from being
    lowered by blurring both branches towards a constant.
    """
    return F.mse_loss(student.float(), teacher.float())


def ramp_weight(epoch: float, *, k: float = 1.0, peak: float = 30.0, fall: float = 2.0) -> float:
    """The self-ensembling weight λ(E): a Gaussian ramp up to ``k`` at epoch ``peak``, then a slower fall.

    λ(E) = k · exp(-5 (1 - E/e)²)            for E <= e  (the ramp-up of Laine & Aila / TCSM)
    λ(E) = k · exp(-5 ((E - e) / (fall·e))²)  for E > e   (the same curve stretched ``fall`` times)

    E counts epochs from 0 and may be fractional (epoch + iteration / iterations per epoch). With k = 1,
    e = 30: λ(0) = 0.0067, λ(15) = 0.29, λ(30) = 1, λ(60) = 0.29, λ(90) = 0.0067. The paper's Eq. 5 is
    garbled in print; its text asks for a Gaussian that rises to k at e and then slowly falls.
    """
    if peak <= 0:
        return k
    if epoch <= peak:
        return k * math.exp(-5.0 * (1.0 - epoch / peak) ** 2)
    return k * math.exp(-5.0 * ((epoch - peak) / (fall * peak)) ** 2)


def adversarial_loss(target_scores: torch.Tensor) -> torch.Tensor:
    """S's adversarial term (Eq. 6): BCE of D's logits on target predictions against the *source* label 1."""
    return F.binary_cross_entropy_with_logits(
        target_scores.float(), torch.ones_like(target_scores, dtype=torch.float32)
    )


def discriminator_loss(source_scores: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
    """D's BCE (Eq. 7, typo fixed): source predictions labelled 1, target 0; the mean of both halves."""
    source = F.binary_cross_entropy_with_logits(
        source_scores.float(), torch.ones_like(source_scores, dtype=torch.float32)
    )
    target = F.binary_cross_entropy_with_logits(
        target_scores.float(), torch.zeros_like(target_scores, dtype=torch.float32)
    )
    return 0.5 * (source + target)


def discriminator_accuracy(source_scores: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
    """Fraction of D's patch scores on the right side of 0.5, averaged over the two domains."""
    return 0.5 * ((source_scores > 0).float().mean() + (target_scores < 0).float().mean())


def reconstruction_loss(reconstruction: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """MSE between R(S(x)) and the normalised image x, over pixels and channels (Eq. 8)."""
    return F.mse_loss(reconstruction.float(), image.float())
