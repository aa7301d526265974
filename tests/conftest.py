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


# Synthetic slides (tests/synthetic.py: tests/ is on sys.path under pytest's default import mode).
@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40x (0.25 µm/px) Aperio-style SVS: 2048 x 2560 px, JPEG tiles of 256, 3 levels (1, 4, 16),
    H&E-like tissue in a central ellipse on white glass."""
    from synthetic import synthetic_he, write_pyramidal_tiff

    path = tmp_path_factory.mktemp("slides") / "synthetic-40x.svs"
    image = synthetic_he((2048, 2560), seed=7, tissue=0.5)
    return write_pyramidal_tiff(path, image, mpp=0.25, app_mag=40)


@pytest.fixture(scope="session")
def synthetic_slide_20x(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20x (0.5 µm/px) Aperio-style SVS, 1024 x 1280 px, 2 levels: worked at 0.25 it is upsampled 2x."""
    from synthetic import synthetic_he, write_pyramidal_tiff

    path = tmp_path_factory.mktemp("slides") / "synthetic-20x.svs"
    image = synthetic_he((1024, 1280), seed=11, tissue=0.6)
    return write_pyramidal_tiff(path, image, mpp=0.5, app_mag=20, levels=2)


needs_full_disk = pytest.mark.skipif(
    not Path("/dev/full").exists(), reason="needs Linux's /dev/full, a file whose disk is always full"
)


def open_on_full_disk(name: object, mode: str) -> object:
    """A stand-in for ``open`` in a module under test: the file it opens is /dev/full, where every write
    that reaches the disk fails with ENOSPC."""
    return open("/dev/full", mode)


def process_ends(pid: int, *, within_s: float = 10.0) -> bool:
    """Whether process ``pid`` ends (exits, or is a zombie left to reap) within ``within_s``."""
    import time

    import psutil

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.01)
    return False
