"""Frozen dataclass configs, one per command, validated on construction and saved beside every output."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import yaml

from wsiuda._version import __version__

C = TypeVar("C")


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


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see either the old content or the whole new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_config(config: Any, path: Path, *, command: str) -> None:
    """Save a command's config as YAML, with the command name and wsiuda's version."""
    document = {"command": command, "wsiuda_version": __version__, "config": config_to_dict(config)}
    atomic_write_text(Path(path), yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
