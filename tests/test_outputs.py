"""Writing outputs: atomic files and the output-folder probe turn a refusing file system into one
OutputError that names the path, and leave no half-written file behind."""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

import pytest

from wsiuda.config import atomic_output, atomic_write_text, prepare_output_folder
from wsiuda.errors import OutputError


def _refuse_new_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder behaves like a read-only mount: creating a file fails, whoever the user is."""

    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def test_a_folder_that_refuses_the_temporary_file_is_an_output_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "summary.json"
    _refuse_new_files(monkeypatch)
    with pytest.raises(OutputError, match=f"cannot write {target}: Read-only file system"):
        atomic_write_text(target, "{}")
    assert not target.exists()


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "summary.json"
    target.write_text("old")

    def disk_full(self: Path, *args: object, **kwargs: object) -> int:
        self.write_bytes(b"half")  # part of the text reached the disk before it filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OutputError, match="No space left on device; free some space"):
        atomic_write_text(target, "new")
    assert target.read_bytes() == b"old"
    assert not list(tmp_path.glob(".*.tmp"))


def test_errors_of_the_callers_own_block_pass_through(tmp_path: Path) -> None:
    # A failure to read an input inside the block is not the output's fault: it keeps its own type.
    with pytest.raises(FileNotFoundError), atomic_output(tmp_path / "out.txt"):
        (tmp_path / "missing-input").read_text()
    assert not list(tmp_path.iterdir())


def test_the_output_folder_probe_catches_what_os_access_misses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "new" / "out"
    prepare_output_folder(folder)
    assert folder.is_dir() and not list(folder.iterdir())  # created, and the probe file removed

    _refuse_new_files(monkeypatch)
    with pytest.raises(OutputError, match=f"{folder}: output folder is not writable .*another with -o"):
        prepare_output_folder(folder)


def test_a_file_where_the_folder_should_be_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        prepare_output_folder(blocker)
