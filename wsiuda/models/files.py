"""Model and checkpoint files: tensors plus plain metadata, never pickled code.

Model files travel between labs, so loading one must never run code. Every file is read with
``torch.load(..., weights_only=True)``, whose unpickler accepts only tensors and plain containers and refuses
anything else (a class with ``__reduce__``, a function) before building it. Files are written to a temporary
name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsiuda.config import atomic_output, writing
from wsiuda.errors import MODEL_FILE_FIX, ModelError
from wsiuda.models.meta import ModelMeta
from wsiuda.models.unet import build_unet

MODEL_FORMAT = "wsiuda-model"
CHECKPOINT_FORMAT = "wsiuda-checkpoint"


def build_network(meta: ModelMeta) -> nn.Module:
    """An untrained network of the architecture ``meta`` describes."""
    if meta.arch == "unet":
        return build_unet(**meta.arch_kwargs)
    raise ModelError(f"unknown architecture {meta.arch!r}")  # ModelMeta already refuses it; kept for mypy


def atomic_torch_save(obj: dict[str, Any], path: Path) -> None:
    # Serialised in memory, then written by Python: torch's writer, given a file by name or as an object,
    # reports a disk that fills up part-way as an opaque RuntimeError ("unexpected pos"), where Python's
    # write raises the OSError it is, which `writing` names. Model files and checkpoints are a few MB.
    serialised = io.BytesIO()
    torch.save(obj, serialised)
    with atomic_output(Path(path)) as tmp, writing(path), open(tmp, "wb") as stream:
        stream.write(serialised.getbuffer())


def cpu_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu").clone() for key, value in network.state_dict().items()}


def save_model(path: Path | str, network: nn.Module, meta: ModelMeta) -> None:
    """Write ``network``'s weights and ``meta`` to ``path`` atomically."""
    atomic_torch_save(
        {"format": MODEL_FORMAT, "meta": meta.to_dict(), "state_dict": cpu_state_dict(network)}, Path(path)
    )


def unpickling_reason(error: Exception) -> str:
    """The line of torch's long weights-only message that names what was refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(error).__name__])[0][:200]


FIXES = {
    "model file": MODEL_FILE_FIX,
    "checkpoint": "its run cannot go on from it; start a new run with another -o folder",
}
"""What a user can do about an unusable file, by its kind."""

_TORCH_CHECK = re.compile(r"^\[enforce fail at [^\]]*\]\s*\.?\s*")
"""The C++ source location that torch's archive reader puts before its messages."""


def safe_load(path: Path | str, *, kind: str) -> dict[str, Any]:
    """Read a file with the weights-only unpickler; anything else than tensors and plain data is refused."""
    path = Path(path)
    fix = FIXES.get(kind, FIXES["model file"])
    if path.is_dir():
        raise ModelError(f"{path} is a folder, not a {kind}; {fix}")
    if not path.is_file():
        raise ModelError(f"{kind} {path} does not exist; {fix}")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path} is not a readable {kind} (not a torch archive written by wsiuda); {fix}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelError(
            f"{path} was refused: it holds objects other than tensors and plain data, and loading it could "
            f"run code ({unpickling_reason(error)}); only use model files written by wsiuda"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(
            f"{path} is not a readable {kind} ({_TORCH_CHECK.sub('', first)[:200]}); {fix}"
        ) from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a wsiuda {kind} (it holds a {type(data).__name__}); {fix}")
    return data


def load_model_file(path: Path | str) -> tuple[nn.Module, ModelMeta]:
    """The network (CPU, eval mode) and its metadata from a model file written by :func:`save_model`."""
    data = safe_load(path, kind="model file")
    if data.get("format") != MODEL_FORMAT:
        fix = (
            "it is a training checkpoint; use model.pt of the run"
            if data.get("format") == CHECKPOINT_FORMAT
            else FIXES["model file"]
        )
        raise ModelError(f"{path} is not a wsiuda model file; {fix}")
    meta = ModelMeta.from_dict(data.get("meta"), source=str(path))
    network = build_network(meta)
    state = data.get("state_dict")
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds no weights; {FIXES['model file']}")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        # torch's first line only says that loading failed; the next ones say what did not fit.
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        reason = (lines[1:] or lines or ["?"])[0]
        raise ModelError(
            f"{path}: weights do not fit the {meta.arch} {meta.arch_kwargs} it declares ({reason[:200]}); "
            f"{FIXES['model file']}"
        ) from None
    return network.eval(), meta
