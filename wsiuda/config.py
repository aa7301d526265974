"""Frozen dataclass configs, one per command, validated on construction and saved beside every output."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml

from wsiuda._version import __version__
from wsiuda.errors import ConfigError, OutputError

C = TypeVar("C")

PRECISIONS = ("auto", "float32", "int8")
"""Arithmetic of the network at inference; ``auto`` is int8 on a CPU when the model file carries an int8
calibration (see wsiuda.models.quantize), else float32."""


def check_finite(config: Any) -> None:
    """Refuse a config holding an infinite or NaN number. Range checks let infinity through and NaN fails
    every comparison quietly: a run with either would go on to empty or meaningless results."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{field.name.replace('_', ' ')} must be a finite number, got {value}")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML- and JSON-safe dict of a dataclass config (paths and tuples become str and list)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    result: dict[str, Any] = plain(config)
    return result


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a config; list values become tuples where the field is a tuple, unknown keys are refused."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        if isinstance(value, list) and "tuple" in str(fields[name].type):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed.

    Readers see either the old file or the whole new one, never half of it, and the file gets the
    permissions a plain ``open()`` would give (mkstemp's 0600 would hide outputs from other users). Where
    the folder refuses the temporary file or the rename, an :class:`~wsiuda.errors.OutputError` names
    ``path``; what the caller's block raises passes through as it is.
    """
    path = Path(path)
    with writing(path):
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        with writing(path):
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (see :func:`atomic_output`); a full disk is an OutputError too."""
    with atomic_output(Path(path)) as tmp, writing(path):
        tmp.write_text(text, encoding="utf-8")


NEW_OUTPUT_FIX = "free some space or choose another folder"
RESUME_FIX = "free some space, then run the same command again: it resumes where it stopped"


@contextmanager
def writing(path: Path, *, fix: str = NEW_OUTPUT_FIX) -> Iterator[None]:
    """The block writes ``path``: an OSError in it (a full disk, a lost mount, a refusing folder) becomes
    one :class:`~wsiuda.errors.OutputError` that names ``path`` and says ``fix``."""
    try:
        yield
    except OSError as error:
        raise write_error(path, error, fix=fix) from None


def write_error(path: Path, error: OSError, *, fix: str = NEW_OUTPUT_FIX) -> OutputError:
    """The :class:`~wsiuda.errors.OutputError` of an OSError met while writing ``path``."""
    return OutputError(f"cannot write {path}: {error.strerror or error}; {fix}")


def prepare_output_folder(folder: Path) -> None:
    """Create ``folder`` and prove it writable with a real file: ``os.access`` is wrong for root, ACLs and
    file systems that refuse new files (read-only mounts, /proc)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder; choose another with -o")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".wsiuda-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise OutputError(
            f"{folder}: output folder is not writable ({error.strerror}); choose another with -o"
        ) from None


def save_config(config: Any, path: Path, *, command: str) -> None:
    """Save a command's config as YAML, with the command name and wsiuda's version."""
    document = {"command": command, "wsiuda_version": __version__, "config": config_to_dict(config)}
    atomic_write_text(Path(path), yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
