"""Inference with a trained segmenter: uint8 RGB tiles in, foreground probabilities out."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsiuda.config import check_precision
from wsiuda.errors import ModelError
from wsiuda.models.files import load_model_file
from wsiuda.models.meta import ModelMeta
from wsiuda.models.normalise import images_to_tensor
from wsiuda.models.quantize import calibrate, quantization_available, quantize
from wsiuda.models.unet import channels_last, fold_batchnorm

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """'auto' takes the GPU where one is present; 'cuda' without one is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but torch sees no GPU (use --device cpu or auto)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r} (use cpu, cuda or auto)") from None


def resolve_precision(precision: str, meta: ModelMeta, device: torch.device) -> str:
    """The arithmetic predict runs in: ``float32`` or ``int8`` (CPU only, needs the model's calibration)."""
    check_precision(precision)
    usable = device.type == "cpu" and bool(meta.activation_ranges) and quantization_available()
    if precision == "auto":
        return "int8" if usable else "float32"
    if precision == "int8" and not usable:
        why = (
            "int8 runs on the CPU only"
            if device.type != "cpu"
            else "the model file carries no int8 calibration (models from `wsiuda adapt` do)"
        )
        raise ModelError(f"--precision int8 is not available: {why}; use --precision float32 or auto")
    return precision


def default_model_path() -> Path:
    return Path(str(resources.files("wsiuda.weights") / "default.pt"))


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """Pad (N, C, H, W) on both sides to multiples of ``multiple``; reflect where the image allows it."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return x, (slice(0, height), slice(0, width))
    top, left = pad_h // 2, pad_w // 2
    padding = (left, pad_w - left, top, pad_h - top)
    # Reflect mirrors real tissue into the border; it needs the pad to be smaller than the image.
    mode = "reflect" if max(padding[:2]) < width and max(padding[2:]) < height else "replicate"
    return F.pad(x, padding, mode=mode), (slice(top, top + height), slice(left, left + width))


class Segmenter:
    """A network plus the metadata that says how to feed it.

    ``predict`` takes uint8 (N, H, W, 3) RGB at ``meta.mpp`` and returns float32 (N, H, W) foreground
    probabilities. Any H and W work: the batch is reflect-padded to a multiple of 2**depth and cropped back.
    """

    def __init__(
        self, network: nn.Module, meta: ModelMeta, device: torch.device, *, precision: str = "float32"
    ) -> None:
        self.meta = meta
        self.device = device
        self.network = channels_last(network.to(device)).eval()
        self.precision = resolve_precision(precision, meta, device)
        # What predict runs: a BatchNorm-folded copy (``network`` stays as loaded, for saving and for
        # training, whose later steps must not see folded weights), in int8 where asked for.
        folded = fold_batchnorm(self.network)
        if self.precision == "int8":
            self._inference = quantize(folded, meta.activation_ranges, in_place=folded is not self.network)
        else:
            self._inference = channels_last(folded)

    @classmethod
    def load(cls, path: Path | str, *, device: str = "auto", precision: str = "float32") -> Segmenter:
        on = resolve_device(device)  # first, and not named after the file: a missing GPU is not the file's
        network, meta = load_model_file(path)
        try:
            return cls(network, meta, on, precision=precision)
        except ModelError as error:  # a precision the model cannot run in
            raise ModelError(f"{path}: {error}") from None

    @classmethod
    def load_default(cls, *, device: str = "auto", precision: str = "float32") -> Segmenter:
        path = default_model_path()
        if not path.is_file():
            raise ModelError("no default model ships with this install; pass -m MODEL.pt from `wsiuda adapt`")
        return cls.load(path, device=device, precision=precision)

    @classmethod
    def from_network(
        cls, network: nn.Module, meta: ModelMeta, *, device: str = "cpu", precision: str = "float32"
    ) -> Segmenter:
        return cls(network, meta, resolve_device(device), precision=precision)

    def calibrated_meta(self, images: Sequence[np.ndarray]) -> ModelMeta:
        """``meta`` with the int8 activation ranges of this network observed on ``images`` (uint8 RGB)."""
        folded = fold_batchnorm(self.network).to("cpu")
        batches = (self._tensor(image[None])[0].cpu() for image in images)
        return dataclasses.replace(self.meta, activation_ranges=calibrate(folded, batches))

    def _tensor(self, images: np.ndarray) -> tuple[torch.Tensor, tuple[slice, slice]]:
        """uint8 (N, H, W, 3) as the network's normalised, padded input on its device, and the crop back."""
        chunk = torch.from_numpy(np.ascontiguousarray(images))
        x = images_to_tensor(chunk.to(self.device, non_blocking=True), self.meta.normalisation)
        return pad_to_multiple(x, 2**self.meta.depth)

    def predict(self, images: np.ndarray, *, batch_size: int = 8, amp: bool = True) -> np.ndarray:
        """Foreground probability of each pixel; ``amp`` uses float16 autocast on a GPU (not on a CPU)."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"predict takes uint8 (N, H, W, 3) RGB, got {images.dtype} {images.shape}")
        count, height, width = images.shape[:3]
        out = np.empty((count, height, width), dtype=np.float32)
        use_amp = amp and self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=use_amp):
            for start in range(0, count, batch_size):
                chunk = images[start : start + batch_size]
                x, crop = self._tensor(chunk)
                logits = self._inference(x.contiguous(memory_format=torch.channels_last))
                probabilities = torch.sigmoid(logits.float())[:, 0, crop[0], crop[1]]
                out[start : start + len(chunk)] = probabilities.cpu().numpy()
        return out
