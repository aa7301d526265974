"""The segmentation network S: a U-Net with BatchNorm, returning logits.

``forward`` returns logits, not probabilities: the losses apply the sigmoid themselves (BCE with logits is
numerically sound where ``log(sigmoid(x))`` underflows), and :class:`~wsiuda.models.Segmenter` applies it
once at inference. The same class, with one input and three linear outputs, is the reconstructor R.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def unet_widths(*, width: int, depth: int, max_width_factor: int = 8) -> list[int]:
    """Channels at each level, 0 (full resolution) to ``depth`` (the bottleneck), doubling up to a cap."""
    return [width * min(2**level, max_width_factor) for level in range(depth + 1)]


def unet_receptive_field(*, depth: int) -> int:
    """Theoretical receptive field, in input pixels, of one output pixel of :func:`build_unet`.

    Each level has two 3x3 convolutions; each encoder level ends in a 2x2 max-pool and each decoder level
    starts with a 2x2 stride-2 transposed convolution (which maps one input pixel to each output pixel, so it
    adds nothing). Summing (k - 1) x stride-product along the deepest path gives 13 * 2**depth - 8:
    44 px at depth 2, 96 at depth 3, 200 at depth 4. A tile halo of half of it makes tiled and whole-image
    predictions agree away from the image border.
    """
    field = 1
    for level in range(depth):  # encoder: two convs then a pool
        field += 2 * 2 * 2**level + 2**level
    field += 2 * 2 * 2**depth  # bottleneck convs
    for level in range(depth):  # decoder convs (the transposed conv adds nothing)
        field += 2 * 2 * 2**level
    return field


class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with BatchNorm and transposed-conv upsampling.

    Input height and width must be multiples of ``2**depth`` (the Segmenter pads to that).
    """

    def __init__(
        self, *, in_channels: int, out_channels: int, width: int, depth: int, max_width_factor: int = 8
    ) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"U-Net width and depth must be >= 1, got width={width}, depth={depth}")
        self.depth = depth
        widths = unet_widths(width=width, depth=depth, max_width_factor=max_width_factor)
        self.down = nn.ModuleList()
        channels = in_channels
        for level in range(depth):
            self.down.append(DoubleConv(channels, widths[level]))
            channels = widths[level]
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(channels, widths[depth])
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for level in reversed(range(depth)):
            self.up.append(nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2))
            self.up_conv.append(DoubleConv(2 * widths[level], widths[level]))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, conv, skip in zip(self.up, self.up_conv, reversed(skips), strict=True):
            x = conv(torch.cat([up(x), skip], dim=1))
        out: torch.Tensor = self.head(x)
        return out


def channels_last(module: nn.Module) -> nn.Module:
    """The module with its 4-D weights in channels_last memory (faster convolutions on CPU and GPU)."""
    out: nn.Module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return out


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An inference copy of ``module`` with every Conv2d -> BatchNorm2d pair folded into one convolution.

    In eval mode BatchNorm is an affine map per channel, so it folds exactly into the convolution before it
    (up to float rounding). Besides skipping a pass over every activation, this avoids eager BatchNorm's
    slow channels_last path on the CPU. ``module`` itself is left untouched, and is returned as it is when
    it holds no such pair.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def pairs(root: nn.Module) -> list[tuple[nn.Sequential, int]]:
        return [
            (sequential, index)
            for sequential in root.modules()
            if isinstance(sequential, nn.Sequential)
            for index in range(len(sequential) - 1)
            if isinstance(sequential[index], nn.Conv2d) and isinstance(sequential[index + 1], nn.BatchNorm2d)
        ]

    if not pairs(module):
        return module
    folded = copy.deepcopy(module).eval()
    for sequential, index in pairs(folded):
        conv, norm = sequential[index], sequential[index + 1]
        assert isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)  # as pairs() found them
        sequential[index] = fuse_conv_bn_eval(conv, norm)
        sequential[index + 1] = nn.Identity()
    return folded


def build_unet(
    *, width: int, depth: int, in_channels: int = 3, out_channels: int = 1, max_width_factor: int = 8
) -> UNet:
    """S (3 -> 1 logits) by default; R is ``build_unet(in_channels=1, out_channels=3, ...)`` (linear)."""
    return UNet(
        in_channels=in_channels,
        out_channels=out_channels,
        width=width,
        depth=depth,
        max_width_factor=max_width_factor,
    )
