"""Shared fixtures. Real data come from WSIUDA_SHARED (default ../shared) and are skipped where absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("WSIUDA_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared() -> Path:
    """The read-only folder of real slides and datasets; tests using it are marked ``realdata``."""
    path = shared_dir()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set WSIUDA_SHARED to the shared/ folder)")
    return path


def shared_file(shared: Path, relative: str) -> Path:
    path = shared / relative
    if not path.exists():
        pytest.skip(f"{path} is absent from the shared folder")
    return path
