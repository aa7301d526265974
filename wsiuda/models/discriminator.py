"""The output-space discriminator D (AdaptSegNet's FCDiscriminator, Tsai et al. 2018).

Input: the one-channel foreground probability map. Output: a logit map at 1/32 of the input size (five 4x4
stride-2 convolutions), one source-vs-target score per patch of the input; the losses use BCE with logits.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_DISCRIMINATOR_WIDTH = 32
"""First layer's width; the layers are width x (1, 2, 4, 8) then 1. AdaptSegNet uses 64 (64-128-256-512-1);
32 costs a quarter of its multiply-adds, which on a CPU is the difference between D costing about as much as
S and a fraction of it, and is set per run with ``--d-width``."""


class FCDiscriminator(nn.Module):
    def __init__(self, *, in_channels: int = 1, width: int = DEFAULT_DISCRIMINATOR_WIDTH) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels in widths:
            layers += [
                nn.Conv2d(channels, out_channels, 4, stride=2, padding=1),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, stride=2, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(probabilities)
        return out


def build_discriminator(*, width: int = DEFAULT_DISCRIMINATOR_WIDTH) -> FCDiscriminator:
    return FCDiscriminator(in_channels=1, width=width)
