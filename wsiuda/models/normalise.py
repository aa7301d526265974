"""Input normalisation shared by training and inference, so both see exactly the same numbers."""

from __future__ import annotations

from typing import Any

import torch


def images_to_tensor(images: torch.Tensor, normalisation: dict[str, Any]) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float32 (N, 3, H, W) in channels_last memory (a free permute)."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if normalisation["scheme"] == "meanstd":
        mean = torch.tensor(normalisation["mean"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(normalisation["std"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last)
