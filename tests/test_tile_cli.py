"""`wsiuda tile` end to end: stores, resuming (also after SIGKILL), batches with bad slides, real slides."""

from __future__ import annotations

import itertools
import multiprocessing.forkserver
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner, Result
from conftest import process_ends
from PIL import Image

from wsiuda.cli.main import cli
from wsiuda.io import open_slide
from wsiuda.io.store import TileStore
from wsiuda.tiling import read_working_region

DATA = Path(__file__).parent / "data"
FAST = ["--tile", "256", "--halo", "16", "--codec", "zstd", "--workers", "1"]


def tile(*args: object) -> Result:
    return CliRunner().invoke(cli, ["tile", *map(str, args)])


def chunk_files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((store / "tiles").glob("c.*"))}


def test_tiles_equal_direct_reads_and_metadata_is_complete(synthetic_slide: Path, tmp_path: Path) -> None:
    result = tile(synthetic_slide, "-o", tmp_path, *FAST)
    assert result.exit_code == 0, result.output
    assert "ok      synthetic-40x.svs" in result.output

    store = TileStore.open(tmp_path / "synthetic-40x.zarr")
    assert store.is_complete
    attrs = store.attrs
    assert attrs["source"]["path"] == str(synthetic_slide.resolve())
    assert attrs["source"]["size"] == synthetic_slide.stat().st_size and "mtime" in attrs["source"]
    # --backend auto reads a TIFF-based slide with tiffslide; the store records the reader actually used.
    assert (attrs["backend"], attrs["slide_mpp"], attrs["target_mpp"]) == ("tiffslide", 0.25, 0.25)
    assert (attrs["scale"], attrs["level_read"]) == (1.0, 0)
    assert attrs["grid"]["rows"] == 8 and attrs["grid"]["cols"] == 10
    assert attrs["config"]["tile"] == 256 and attrs["wsiuda_version"]
    # The tissue ellipse covers about half the slide: background tiles are skipped.
    assert 30 <= len(store) < 80
    assert store.tissue_mask() is not None
    config = yaml.safe_load((tmp_path / "tile_config.yaml").read_text())
    assert config["command"] == "tile" and config["config"]["halo"] == 16

    pixels, regions = store.read_tiles()
    with open_slide(synthetic_slide) as reader:
        for array, region in zip(pixels, regions, strict=True):
            np.testing.assert_array_equal(array, read_working_region(reader, region, scale=1.0))


def test_rerun_skips_complete_store_and_overwrite_redoes_it(synthetic_slide: Path, tmp_path: Path) -> None:
    assert tile(synthetic_slide, "-o", tmp_path, *FAST).exit_code == 0
    store = tmp_path / "synthetic-40x.zarr"
    chunk = next((store / "tiles").glob("c.*"))
    stamp = chunk.stat().st_mtime_ns
    again = tile(synthetic_slide, "-o", tmp_path, *FAST)
    assert again.exit_code == 0 and "already complete" in again.output
    assert chunk.stat().st_mtime_ns == stamp
    redo = tile(synthetic_slide, "-o", tmp_path, *FAST, "--overwrite")
    assert redo.exit_code == 0 and "already complete" not in redo.output
    assert chunk.stat().st_mtime_ns != stamp
    assert TileStore.open(store).is_complete


def test_rerun_with_other_settings_is_refused(synthetic_slide: Path, tmp_path: Path) -> None:
    assert tile(synthetic_slide, "-o", tmp_path, *FAST).exit_code == 0
    result = tile(synthetic_slide, "-o", tmp_path, *FAST, "--min-tissue", "0.5")
    assert result.exit_code == 1
    assert "other settings; pass --overwrite" in result.output


def test_20x_slide_is_upsampled_to_40x(synthetic_slide_20x: Path, tmp_path: Path) -> None:
    result = tile(synthetic_slide_20x, "-o", tmp_path, *FAST)
    assert result.exit_code == 0, result.output
    store = TileStore.open(tmp_path / "synthetic-20x.zarr")
    assert (store.attrs["scale"], store.attrs["level_read"]) == (2.0, 0)
    assert store.attrs["working_shape"] == [2048, 2560]
    pixels, regions = store.read_tiles([0])
    with open_slide(synthetic_slide_20x) as reader:
        np.testing.assert_array_equal(pixels[0], read_working_region(reader, regions[0], scale=2.0))


def test_jpeg_default_codec_and_two_workers_match_one(
    synthetic_slide_20x: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsiuda.pipelines import worker_setup

    servers: list[int | None] = []
    real_start = worker_setup.start_fork_server

    def recording_start() -> None:
        real_start()
        servers.append(multiprocessing.forkserver._forkserver._forkserver_pid)

    monkeypatch.setattr(worker_setup, "start_fork_server", recording_start)
    args = ["--mpp", "0.5", "--tile", "128", "--halo", "8"]
    one = tile(synthetic_slide_20x, "-o", tmp_path / "one", *args, "--workers", "1")
    two = tile(synthetic_slide_20x, "-o", tmp_path / "two", *args, "--workers", "2")
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    # The workers' fork server, started by the command, ends with the command, not when this process does.
    if "forkserver" in multiprocessing.get_all_start_methods():
        (server,) = servers  # the two-worker run's
        assert server is not None and process_ends(server), "the fork server outlived the command"
    store = TileStore.open(tmp_path / "one" / "synthetic-20x.zarr")
    assert store.attrs["codec"] == "jpeg"
    assert chunk_files(tmp_path / "one" / "synthetic-20x.zarr") == chunk_files(
        tmp_path / "two" / "synthetic-20x.zarr"
    )


def test_batch_reports_bad_slides_on_one_line_each_and_finishes_the_rest(
    synthetic_slide: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(synthetic_slide, folder / "good.svs")
    shutil.copy(DATA / "truncated.svs", folder / "truncated.svs")
    shutil.copy(DATA / "not-a-slide.svs", folder / "text.svs")
    missing = tmp_path / "missing.svs"
    result = tile(folder, missing, "-o", tmp_path / "out", *FAST)
    assert result.exit_code == 1
    failed = [line for line in result.output.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 3
    for name in ("truncated.svs", "text.svs", "missing.svs"):
        assert sum(name in line for line in failed) == 1
    assert "3 of 4 slides failed" in result.output
    only_bad = tile(folder / "truncated.svs", missing, "-o", tmp_path / "out", *FAST)
    assert only_bad.exit_code == 1
    assert only_bad.output.splitlines()[-1] == "Error: all 2 slides failed (listed above)"
    assert TileStore.open(tmp_path / "out" / "good.zarr").is_complete
    assert not (tmp_path / "out" / "truncated.zarr").exists()


def test_an_unreadable_slide_fails_on_its_turn_and_the_batch_goes_on(
    synthetic_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slide this user may not read (chmod 000; root reads it anyway, so the refusal is simulated)."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(synthetic_slide, folder / "a-good.svs")
    locked = folder / "locked.svs"
    shutil.copy(synthetic_slide, locked)
    real_open = Path.open

    def refusing_open(self: Path, *args: object, **kwargs: object) -> object:
        if self.name == locked.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", refusing_open)
    for inputs in ([folder], [folder / "a-good.svs", locked]):  # a folder, and the files named directly
        result = tile(*inputs, "-o", tmp_path / "out", *FAST, "--overwrite")
        assert result.exit_code == 1, result.output
        (failed,) = [line for line in result.output.splitlines() if line.startswith("FAILED")]
        assert f"{locked}: permission denied; give read access" in failed
        assert TileStore.open(tmp_path / "out" / "a-good.zarr").is_complete


def test_a_full_disk_fails_the_slide_with_its_fix_and_a_rerun_resumes(
    synthetic_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import zarr

    out = tmp_path / "out"
    with monkeypatch.context() as disk:

        def full(self: object, *args: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        disk.setattr(zarr.Array, "__setitem__", full)  # every tile's write (zstd tiles go through zarr)
        result = tile(synthetic_slide, "-o", out, *FAST)
    assert result.exit_code == 1, result.output
    (failed,) = [line for line in result.output.splitlines() if line.startswith("FAILED")]
    assert f"cannot write {out / 'synthetic-40x.zarr'}: No space left on device" in failed
    assert "run the same command again" in failed
    assert "Traceback" not in result.output

    resumed = tile(synthetic_slide, "-o", out, *FAST)
    assert resumed.exit_code == 0, resumed.output
    assert TileStore.open(out / "synthetic-40x.zarr").is_complete


def test_output_that_is_not_a_store_is_left_alone(synthetic_slide: Path, tmp_path: Path) -> None:
    taken = tmp_path / "synthetic-40x.zarr"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = tile(synthetic_slide, "-o", tmp_path, *FAST, *extra)
        assert result.exit_code == 1
        assert f"{taken} exists and is not a wsiuda tile store" in result.output
    assert (taken / "notes.txt").read_text() == "mine"


def test_unwritable_output_folder(synthetic_slide: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = Path("/sys/kernel/wsiuda-out")  # root may write anywhere else; sysfs refuses even root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        target = locked / "out"
    result = tile(synthetic_slide, "-o", target, *FAST)
    assert result.exit_code == 2
    assert "Error:" in result.output and "not writable" in result.output and str(target) in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error:")]) == 1


def test_no_tissue_and_no_mpp(tmp_path: Path) -> None:
    glass = tmp_path / "glass.png"
    Image.fromarray(np.full((600, 700, 3), 246, dtype=np.uint8)).save(glass)
    no_mpp = tile(glass, "-o", tmp_path / "out", *FAST)
    assert no_mpp.exit_code == 1 and "has no mpp in its metadata; pass --slide-mpp" in no_mpp.output
    blank = tile(glass, "-o", tmp_path / "out", *FAST, "--slide-mpp", "0.25")
    assert blank.exit_code == 1 and "glass.png: no tissue found" in blank.output
    everything = tile(glass, "-o", tmp_path / "out", *FAST, "--slide-mpp", "0.25", "--min-tissue", "0")
    assert everything.exit_code == 0, everything.output
    assert len(TileStore.open(tmp_path / "out" / "glass.zarr")) == 3 * 3


def test_bad_option_values_are_one_line_errors(synthetic_slide: Path, tmp_path: Path) -> None:
    result = tile(synthetic_slide, "-o", tmp_path, "--tile", "64", "--halo", "100")
    assert result.exit_code == 2 and "--halo must be 0..tile" in result.output


def test_sigkill_midway_then_rerun_gives_the_same_store(synthetic_slide_20x: Path, tmp_path: Path) -> None:
    # 320 small tiles so the kill lands mid-way; zstd so equality is byte-exact without JPEG in the way.
    args = ["--mpp", "0.5", "--tile", "64", "--halo", "4", "--min-tissue", "0", "--codec", "zstd"]
    args += ["--workers", "1"]
    script = Path(sys.executable).parent / "wsiuda"
    command = [str(script), "-q", "tile", str(synthetic_slide_20x), *args]
    killed_store = tmp_path / "killed" / "synthetic-20x.zarr"
    process = subprocess.Popen([*command, "-o", str(tmp_path / "killed")], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if len(list((killed_store / "tiles").glob("c.*"))) >= 40 if killed_store.exists() else False:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed = TileStore.open(killed_store)
    assert not killed.is_complete and 0 < killed.done().sum() < len(killed)

    rerun = subprocess.run([*command, "-o", str(tmp_path / "killed")], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "from an earlier run" in rerun.stdout
    clean = subprocess.run([*command, "-o", str(tmp_path / "clean")], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr

    resumed, fresh = TileStore.open(killed_store), TileStore.open(tmp_path / "clean" / "synthetic-20x.zarr")
    assert resumed.is_complete and fresh.is_complete
    np.testing.assert_array_equal(resumed.read_tiles()[0], fresh.read_tiles()[0])
    assert resumed.core_regions == fresh.core_regions


# ------------------------------------------------------------------------------------------- real slides
@pytest.mark.realdata
def test_cmu1_20x_tiles_at_40x_with_2x_resampling(shared: Path, tmp_path: Path) -> None:
    from conftest import shared_file

    path = shared_file(shared, "slides/CMU-1-Small-Region.svs")
    result = tile(path, "-o", tmp_path, *FAST)
    assert result.exit_code == 0, result.output
    store = TileStore.open(tmp_path / "CMU-1-Small-Region.zarr")
    assert store.is_complete
    assert store.attrs["scale"] == pytest.approx(0.499 / 0.25, rel=1e-3)
    assert store.attrs["working_shape"] == [5923, 4432]  # ceil(2967 x 1.996), ceil(2220 x 1.996)
    assert len(store) > 100


@pytest.mark.realdata
def test_jpeg2000_svs_needs_slide_mpp(shared: Path, tmp_path: Path) -> None:
    from conftest import shared_file

    path = shared_file(shared, "slides/tcga-cr-7395-01a-01-ts1.svs")
    refused = tile(path, "-o", tmp_path, *FAST)
    assert refused.exit_code == 1
    assert f"{path} has no mpp in its metadata; pass --slide-mpp 0.25 (40x) or 0.5 (20x)" in refused.output
    # Worked at 1 µm/px (scale 0.5) to keep the test quick; level 1 has exactly that resolution.
    works = tile(path, "-o", tmp_path, *FAST, "--slide-mpp", "0.5", "--mpp", "1.0")
    assert works.exit_code == 0, works.output
    store = TileStore.open(tmp_path / "tcga-cr-7395-01a-01-ts1.zarr")
    assert store.is_complete and store.attrs["slide_mpp_origin"] == "--slide-mpp"
    assert store.attrs["level_read"] == 1


@pytest.mark.realdata
def test_dicom_fails_clearly_and_plain_tiff_works_with_slide_mpp(shared: Path, tmp_path: Path) -> None:
    from conftest import shared_file

    dicom = shared_file(shared, "slides/pathml_small_dicom.dcm")
    kidney = shared_file(shared, "slides/kidney-48-5.tif")
    result = tile(dicom, kidney, "-o", tmp_path, *FAST, "--slide-mpp", "0.5", "--min-tissue", "0")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert any(line.startswith("FAILED  pathml_small_dicom.dcm") and "DICOM" in line for line in lines)
    assert TileStore.open(tmp_path / "kidney-48-5.zarr").is_complete


@pytest.mark.parametrize(("pending", "workers"), [(1, 1), (15, 2), (2260, 2), (9000, 2), (5000, 8)])
def test_task_runs_cover_the_tiles_once_and_shrink_towards_the_end(pending: int, workers: int) -> None:
    from wsiuda.pipelines.tile import TileConfig, batch_sizes

    sizes = batch_sizes(pending, TileConfig(workers=workers))
    assert sum(sizes) == pending and all(0 < size <= 256 for size in sizes)
    assert all(a >= b for a, b in itertools.pairwise(sizes))  # long runs first
    # The last runs are short, so workers finish close together; the first are long, for the tile cache.
    assert sizes[-1] <= 16
    if pending >= 2000:
        assert sizes[0] >= 128 and len(sizes) < pending / 32


def test_a_fixed_batch_size_is_kept() -> None:
    from wsiuda.pipelines.tile import TileConfig, batch_sizes

    assert batch_sizes(50, TileConfig(batch=16)) == [16, 16, 16, 2]
