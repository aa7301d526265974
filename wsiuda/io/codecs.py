"""A JPEG chunk codec for zarr v3, so tile stores can be lossy like the slides they come from.

zarr 3 does not take numcodecs-2 codecs such as ``imagecodecs.numcodecs.Jpeg`` directly; this is the
same libjpeg-turbo encoder (through imagecodecs) as a zarr 3 array-to-bytes codec. Each chunk must be one
RGB image, shaped (1, H, W, 3) or (H, W, 3). Readers need ``wsiuda`` importable (the codec is registered
on import of :mod:`wsiuda.io.store` and through the ``zarr.codecs`` entry point).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.buffer import Buffer, NDBuffer

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec

JPEG_CODEC_NAME = "wsiuda.jpeg"


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """Baseline JPEG (libjpeg-turbo) of one RGB uint8 image per chunk; ``level`` is the quality 1-100."""

    is_fixed_size = False
    level: int = 90
    subsampling: str = "444"

    def __init__(self, *, level: int = 90, subsampling: str = "444") -> None:
        if not 1 <= int(level) <= 100:
            raise ValueError(f"JPEG quality must be 1-100, got {level}")
        if subsampling not in ("444", "422", "420"):
            raise ValueError(f"JPEG subsampling must be 444, 422 or 420, got {subsampling!r}")
        object.__setattr__(self, "level", int(level))
        object.__setattr__(self, "subsampling", subsampling)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        configuration = data.get("configuration") or {}
        return cls(**configuration)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": JPEG_CODEC_NAME,
            "configuration": {"level": self.level, "subsampling": self.subsampling},
        }

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        chunk_shape = getattr(chunk_grid, "chunk_shape", None)
        if chunk_shape is not None and (
            chunk_shape[-1] != 3 or int(np.prod(chunk_shape[:-3])) != 1 or len(chunk_shape) < 3
        ):
            raise ValueError(f"the JPEG codec needs chunks of one RGB image, got chunk shape {chunk_shape}")
        if np.dtype(dtype.to_native_dtype()) != np.uint8:
            raise ValueError("the JPEG codec needs uint8 data")

    # zarr runs codecs on its one event-loop thread; libjpeg-turbo releases the GIL, so handing the work
    # to a thread lets several writers encode at once (as zarr's own numcodecs wrappers do).
    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode, chunk_bytes, chunk_spec)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return await asyncio.to_thread(self._encode, chunk_array, chunk_spec)

    def _decode(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        import imagecodecs

        image = imagecodecs.jpeg_decode(chunk_bytes.as_numpy_array().tobytes())
        return chunk_spec.prototype.nd_buffer.from_numpy_array(image.reshape(chunk_spec.shape))

    def _encode(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer:
        image = chunk_array.as_numpy_array().reshape(chunk_spec.shape[-3:])
        return chunk_spec.prototype.buffer.from_bytes(self.encode_image(image))

    def encode_image(self, image: np.ndarray) -> bytes:
        """The chunk bytes of one (H, W, 3) uint8 image, exactly as zarr would store them."""
        import imagecodecs

        encoded = imagecodecs.jpeg_encode(
            np.ascontiguousarray(image), level=self.level, subsampling=self.subsampling
        )
        return bytes(encoded)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        raise NotImplementedError


def register() -> None:
    """Make the codec known to zarr in this process (idempotent)."""
    from zarr.registry import register_codec

    register_codec(JPEG_CODEC_NAME, JpegCodec)
