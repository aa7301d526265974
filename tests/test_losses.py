"""Each loss term and the ramp against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsiuda.augment import dihedral as numpy_dihedral
from wsiuda.train import losses
from wsiuda.train.pseudo import class_balanced_pseudo_labels, portion_for_round


def test_dice_loss_by_hand() -> None:
    p = torch.tensor([[0.9, 0.2], [0.6, 0.0]])
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # intersection 1.5, sizes 1.7 + 2 -> 1 - (3 + 1) / (3.7 + 1)
    assert losses.dice_loss(p, y).item() == pytest.approx(1 - 4 / 4.7)
    assert losses.dice_loss(p, y, smooth=0).item() == pytest.approx(1 - 3 / 3.7)
    # Empty truth and empty prediction: perfect, thanks to the smooth term.
    assert losses.dice_loss(torch.zeros(4), torch.zeros(4)).item() == 0.0
    # A weight of 0 leaves a pixel out.
    weight = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert losses.dice_loss(p, y, weight=weight, smooth=0).item() == pytest.approx(1 - 3 / 3.5)


def test_bce_by_hand_and_masked() -> None:
    logits = torch.tensor([0.0, 2.0])
    target = torch.tensor([1.0, 0.0])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert losses.bce_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    masked = losses.bce_loss(logits, target, weight=torch.tensor([1.0, 0.0])).item()
    assert masked == pytest.approx(math.log(2), rel=1e-6)


def test_binary_entropy_has_both_terms_and_is_stable() -> None:
    assert losses.binary_entropy(torch.zeros(3, 3)).item() == pytest.approx(math.log(2))
    p = 0.8
    logit = math.log(p / (1 - p))
    expected = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert losses.binary_entropy(torch.tensor([logit])).item() == pytest.approx(expected, rel=1e-5)
    saturated = losses.binary_entropy(torch.tensor([-200.0, 200.0]))
    assert torch.isfinite(saturated) and saturated.item() == pytest.approx(0.0, abs=1e-6)


def test_ramp_is_a_gaussian_peaking_at_30_with_a_slower_fall() -> None:
    assert losses.ramp_weight(0) == pytest.approx(math.exp(-5))
    assert losses.ramp_weight(15) == pytest.approx(math.exp(-1.25))
    assert losses.ramp_weight(30) == pytest.approx(1.0)
    assert losses.ramp_weight(60) == pytest.approx(math.exp(-1.25))
    assert losses.ramp_weight(90) == pytest.approx(math.exp(-5))
    assert losses.ramp_weight(30, k=0.5) == pytest.approx(0.5)
    values = [losses.ramp_weight(e) for e in range(0, 91)]
    assert int(np.argmax(values)) == 30
    assert losses.ramp_weight(30 - 10) < losses.ramp_weight(30 + 10)  # falls slower than it rises


def _convolution(kernel: list[list[float]]) -> torch.nn.Module:
    """A 3-channel → 1 network whose 3x3 kernel is ``kernel`` on every channel."""
    network = torch.nn.Conv2d(3, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        network.weight.copy_(torch.tensor(kernel).expand(1, 3, 3, 3))
    return network


def test_consistency_is_zero_for_an_equivariant_network_and_not_otherwise() -> None:
    """The trainer's term, MSE between S(T(x)) and T(S(x)): zero for a network that commutes with the 8
    symmetries (a kernel symmetric under all of them), positive for one that does not, except under the
    identity."""
    from types import SimpleNamespace

    from wsiuda.train.trainer import Trainer

    x = torch.rand(8, 3, 12, 12)
    symmetric = _convolution([[0.1, 0.5, 0.1], [0.5, -1.0, 0.5], [0.1, 0.5, 0.1]])
    lopsided = _convolution([[0.9, 0.0, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, -0.7]])
    for network, equivariant in ((symmetric, True), (lopsided, False)):
        trainer = SimpleNamespace(s=network)
        with torch.no_grad():
            probabilities = torch.sigmoid(network(x))
            for k in range(8):
                term = Trainer.consistency(trainer, x, probabilities, (k,) * len(x)).item()  # type: ignore[arg-type]
                if equivariant or k == 0:
                    assert term == pytest.approx(0.0, abs=1e-12), (equivariant, k)
                else:
                    assert term > 1e-4, k


def test_consistency_loss_is_the_mean_squared_error() -> None:
    a, b = torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.0])
    assert losses.consistency_loss(a, b).item() == pytest.approx((0.25 + 1.0) / 2)


def test_the_8_symmetries_are_distinct_and_match_the_numpy_convention() -> None:
    image = np.arange(9, dtype=np.float32).reshape(3, 3)
    seen = set()
    for k in range(8):
        torch_out = losses.dihedral(torch.from_numpy(image)[None, None], k)[0, 0].numpy()
        np.testing.assert_array_equal(torch_out, numpy_dihedral(image, k))
        seen.add(torch_out.tobytes())
    assert len(seen) == 8
    batch = torch.from_numpy(np.stack([image, image]))[:, None]
    out = losses.dihedral_batch(batch, [1, 5])
    np.testing.assert_array_equal(out[1, 0].numpy(), numpy_dihedral(image, 5))


def test_adversarial_and_discriminator_losses_by_hand() -> None:
    zeros = torch.zeros(1, 1, 2, 2)
    assert losses.adversarial_loss(zeros).item() == pytest.approx(math.log(2))
    # S wants D to call target "source" (1): a confident D score of +3 on target costs little.
    assert losses.adversarial_loss(torch.full((1, 1), 3.0)).item() == pytest.approx(
        math.log(1 + math.exp(-3))
    )
    source, target = torch.full((2,), 2.0), torch.full((2,), -1.0)
    expected = 0.5 * (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)))
    assert losses.discriminator_loss(source, target).item() == pytest.approx(expected, rel=1e-6)
    # Swapped labels (the paper's Eq. 7 typo) would score worse: D is rewarded for source=1, target=0.
    assert losses.discriminator_loss(target, source).item() > losses.discriminator_loss(source, target).item()
    accuracy = losses.discriminator_accuracy(torch.tensor([1.0, -1.0]), torch.tensor([-1.0, -2.0]))
    assert accuracy.item() == pytest.approx(0.75)


def test_reconstruction_mse_by_hand() -> None:
    reconstruction = torch.zeros(1, 3, 1, 2)
    image = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]], [[0.0, 0.0]]]])
    assert losses.reconstruction_loss(reconstruction, image).item() == pytest.approx(5 / 6)


def test_class_balanced_pseudo_labels_keep_the_top_portion_of_each_class() -> None:
    p = np.array([0.95, 0.9, 0.7, 0.6, 0.4, 0.3, 0.1, 0.05, 0.02, 0.01], dtype=np.float32)
    labels = class_balanced_pseudo_labels(p, portion=0.5)
    # Foreground 0.95, 0.9, 0.7, 0.6: median 0.8 keeps 0.95 and 0.9. Background confidences (1 - p)
    # 0.6, 0.7, 0.9, 0.95, 0.98, 0.99: median 0.925 keeps the last three.
    np.testing.assert_array_equal(labels, [1, 1, -1, -1, -1, -1, -1, 0, 0, 0])
    assert labels.dtype == np.int8
    assert (class_balanced_pseudo_labels(np.zeros(4), portion=0.2) <= 0).all()
    assert portion_for_round(0, start=0.2, step=0.05, maximum=0.5) == 0.2
    assert portion_for_round(10, start=0.2, step=0.05, maximum=0.5) == 0.5
