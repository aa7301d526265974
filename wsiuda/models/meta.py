"""What a model file says about the network it holds, so that ``segment`` can use it without its config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from wsiuda._version import __version__
from wsiuda.errors import MODEL_FILE_FIX, ModelError

FORMAT_VERSION = 1
"""Bumped when a model file written by this version cannot be read correctly by an older reader."""

ARCHITECTURES = ("unet",)

DEFAULT_NORMALISATION: dict[str, Any] = {
    "scheme": "meanstd",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
}
"""Used where no training data set the statistics (tests, untrained networks)."""


def receptive_field_px(arch: str, arch_kwargs: dict[str, Any]) -> int:
    """The architecture's theoretical receptive field in working-resolution pixels."""
    if arch == "unet":
        from wsiuda.models.unet import unet_receptive_field

        return unet_receptive_field(depth=int(arch_kwargs["depth"]))
    raise ModelError(f"unknown architecture {arch!r}; this wsiuda knows {', '.join(ARCHITECTURES)}")


def check_normalisation(normalisation: dict[str, Any]) -> None:
    scheme = normalisation.get("scheme")
    if scheme == "meanstd":
        mean, std = normalisation.get("mean"), normalisation.get("std")
        if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == 3 and len(std) == 3):
            raise ModelError(f"meanstd normalisation needs 3 means and 3 stds, got {normalisation}")
        if min(float(s) for s in std) <= 0:
            raise ModelError(f"normalisation std must be positive, got {std}")
    elif scheme != "unit":
        raise ModelError(f"unknown normalisation scheme {scheme!r} (known: meanstd, unit)")


@dataclass(frozen=True)
class ModelMeta:
    """Metadata stored beside the weights in ``model.pt``.

    ``normalisation`` applies to RGB scaled to 0-1: ``{"scheme": "meanstd", "mean": [r, g, b], "std": [...]}``
    (statistics of the source training images) or ``{"scheme": "unit"}`` (0-1 as is).
    ``receptive_field_px`` is computed from the architecture when left at 0; the tile halo comes from it.
    """

    arch: str = "unet"
    arch_kwargs: dict[str, Any] = field(default_factory=lambda: {"width": 16, "depth": 4})
    mpp: float = 0.25
    patch_size: int = 256
    normalisation: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_NORMALISATION))
    method: str = "source-only"
    receptive_field_px: int = 0
    training_data: tuple[dict[str, str], ...] = ()
    """One ``{"name": ..., "license": ...}`` per dataset the weights were trained on (source and target)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The training run's config, as plain data (informational)."""
    activation_ranges: dict[str, list[float]] = field(default_factory=dict)
    """int8 calibration: the observed (min, max) of each quantized activation (see wsiuda.models.quantize);
    empty: the model runs in float32 only."""
    wsiuda_version: str = __version__
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ModelError(
                f"unknown architecture {self.arch!r}; this wsiuda knows {', '.join(ARCHITECTURES)}"
            )
        if self.mpp <= 0 or self.patch_size < 1:
            raise ModelError(f"model mpp and patch size must be positive, got {self.mpp}, {self.patch_size}")
        check_normalisation(self.normalisation)
        if self.receptive_field_px <= 0:
            object.__setattr__(self, "receptive_field_px", receptive_field_px(self.arch, self.arch_kwargs))

    @property
    def depth(self) -> int:
        return int(self.arch_kwargs.get("depth", 1))

    def to_dict(self) -> dict[str, Any]:
        """Plain data only (str, int, float, bool, list, dict), so a weights-only loader accepts it."""
        data = dataclasses.asdict(self)
        data["training_data"] = [dict(item) for item in self.training_data]
        return data

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "model file") -> ModelMeta:
        if not isinstance(data, dict):
            raise ModelError(f"{source} has no metadata dict; it was not written by wsiuda")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise ModelError(
                f"{source} has model format version {version!r}, this wsiuda {__version__} reads versions "
                f"1 to {FORMAT_VERSION}; upgrade wsiuda (pip install -U wsiuda) or use a model made by it"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {key: value for key, value in data.items() if key in names}  # newer keys of a minor update
        kwargs["training_data"] = tuple(dict(item) for item in kwargs.get("training_data", ()))
        try:
            return cls(**kwargs)
        except (TypeError, ValueError, KeyError, ModelError) as error:
            raise ModelError(f"{source} has malformed metadata: {error}; {MODEL_FILE_FIX}") from None
