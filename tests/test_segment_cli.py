"""`wsiuda segment` from the command line: one-line errors, a batch going on past a bad slide, a Dask
cluster at an address, and a real slide end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import shared_file
from test_geojson import check_qupath_detection
from test_segment import save_dark_model, write_slide

from wsiuda.cli.main import cli
from wsiuda.io.geojson import load_features


def run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, ["segment", *args])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


@pytest.fixture(scope="module")
def dark_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_dark_model(tmp_path_factory.mktemp("models") / "dark.pt")


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synthetic import synthetic_he

    return write_slide(
        tmp_path_factory.mktemp("slides") / "small.svs",
        synthetic_he((256, 320), seed=5),
        mpp=0.25,
        app_mag=40,
    )


def test_a_bad_slide_is_reported_and_the_batch_goes_on(
    tmp_path: Path, small_slide: Path, dark_model: Path
) -> None:
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)  # a TIFF header and nothing behind it
    out = tmp_path / "out"
    result = run(
        str(bad), str(small_slide), "-o", str(out), "-m", str(dark_model), "--scheduler", "sync", "--no-crf"
    )
    assert result.exit_code == 1, result.output
    # The failure as it happened, then the batch's count; nothing else names the bad slide.
    reported, count = error_lines(result.output)
    assert "broken.svs" in reported
    assert count == "Error: 1 of 2 slides failed (listed above); the others are done"
    assert sum("broken.svs" in line for line in result.output.splitlines()) == 1
    assert "Traceback" not in result.output
    assert len(load_features(out / "small.geojson")) > 5
    assert not (out / "broken.geojson").exists()


def test_a_tile_that_fails_to_decode_is_one_line_from_the_local_cluster(
    tmp_path: Path, small_slide: Path, dark_model: Path
) -> None:
    """A slide whose structure is sound but one of its tiles is damaged fails in a task on the cluster's
    worker; the user gets the one line, and the worker logs no failed task with its traceback."""
    import logging

    import tifffile
    from synthetic import synthetic_he

    # Long enough that tissue is found on level 1: only the tasks read level 0, and one of its tiles in
    # the middle is damaged.
    damaged = write_slide(tmp_path / "damaged.svs", synthetic_he((512, 4608), seed=6), mpp=0.25, app_mag=40)
    with tifffile.TiffFile(damaged) as tif:
        level0 = tif.pages[0]
        offset = level0.dataoffsets[len(level0.dataoffsets) // 2]
    with damaged.open("r+b") as handle:
        handle.seek(offset)
        handle.write(bytes(16))

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    records = Records()
    cluster_log = logging.getLogger("distributed")
    cluster_log.addHandler(records)
    try:
        out = tmp_path / "out"
        result = run(
            str(damaged), str(small_slide), "-o", str(out), "-m", str(dark_model), "--workers", "1",
            "--tile", "512", "--no-crf",
        )  # fmt: skip
    finally:
        cluster_log.removeHandler(records)
    assert result.exit_code == 1, result.output
    reported, count = error_lines(result.output)
    assert "damaged.svs" in reported and "failed" in reported and "copy it again" in reported
    assert count == "Error: 1 of 2 slides failed (listed above); the others are done"
    assert "Traceback" not in result.output
    assert records.messages == []
    assert len(load_features(out / "small.geojson")) > 5
    assert not (out / "damaged.geojson").exists()


def test_a_lone_bad_slide_is_one_line(tmp_path: Path, dark_model: Path) -> None:
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    result = run(str(bad), "-o", str(tmp_path / "n.geojson"), "-m", str(dark_model), "--scheduler", "sync")
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and "broken.svs" in line


def test_a_full_disk_is_one_line_and_a_rerun_resumes(
    tmp_path: Path, small_slide: Path, dark_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from wsiuda.io import chunks

    out = tmp_path / "n.geojson"
    arguments = (str(small_slide), "-o", str(out), "-m", str(dark_model), "--no-crf", "--tile", "128")
    with monkeypatch.context() as disk:

        def full(*args: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        disk.setattr(chunks, "write_chunk_file", full)  # every tile's write to the mask store
        result = run(*arguments)
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and "Traceback" not in result.output
    assert f"cannot write {tmp_path / 'n.mask.zarr'}: No space left on device" in line
    assert "run the same command again" in line
    assert not out.exists()

    resumed = run(*arguments)  # space freed: the same command finishes the slide
    assert resumed.exit_code == 0, resumed.output
    assert len(load_features(out)) > 5


def test_an_incompatible_model_file_is_one_line(tmp_path: Path, small_slide: Path) -> None:
    (tmp_path / "text.pt").write_text("not a model")
    (tmp_path / "folder.pt").mkdir()
    for name in ("text.pt", "folder.pt", "missing.pt"):
        result = run(str(small_slide), "-o", str(tmp_path / "n.geojson"), "-m", str(tmp_path / name))
        assert result.exit_code == 2
        (line,) = error_lines(result.output)
        assert name in line and "pass a model.pt written by `wsiuda adapt`" in line, line
        assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("taken", ["n.geojson", "n.summary.json", "n.overlay.png"])
def test_a_folder_where_an_output_file_goes_is_one_line_before_any_work(
    tmp_path: Path, small_slide: Path, dark_model: Path, taken: str
) -> None:
    (tmp_path / taken).mkdir()
    args = [str(small_slide), "-o", str(tmp_path / "n.geojson"), "-m", str(dark_model), "--overwrite"]
    result = run(*args)
    assert result.exit_code == 1
    (line,) = error_lines(result.output)
    assert f"{tmp_path / taken} is a folder" in line and "choose another -o" in line
    assert not (tmp_path / "n.mask.zarr").exists()  # no tile was run


def test_a_missing_gpu_is_one_line_about_the_device(
    tmp_path: Path, small_slide: Path, dark_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [str(small_slide), "-o", str(tmp_path / "n.geojson"), "-m", str(dark_model), "--device", "cuda"]
    result = run(*args)
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert line == "Error: --device cuda was asked for but torch sees no GPU (use --device cpu or auto)"


def test_an_unwritable_output_is_one_line(tmp_path: Path, small_slide: Path, dark_model: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run(str(small_slide), "-o", str(blocker / "n.geojson"), "-m", str(dark_model))
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert "a-file" in line and "-o" in line


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, which refuses new files")
def test_a_folder_that_refuses_new_files_is_one_line_before_any_work(
    small_slide: Path, dark_model: Path
) -> None:
    # /proc passes os.access for root, yet no file can be created in it: only a real file tells.
    result = run(str(small_slide), "-o", "/proc/n.geojson", "-m", str(dark_model))
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert "/proc" in line and "not writable" in line and "-o" in line


def test_one_file_output_for_several_slides_is_refused(
    tmp_path: Path, small_slide: Path, dark_model: Path
) -> None:
    result = run(str(small_slide), str(small_slide), "-o", str(tmp_path / "n.geojson"), "-m", str(dark_model))
    assert result.exit_code == 2
    assert "folder" in error_lines(result.output)[0]


def test_without_a_model_the_missing_default_is_one_line(
    tmp_path: Path, small_slide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from wsiuda.pipelines.segment import model

    # An install without the default model: its package folder holds no default.pt.
    monkeypatch.setattr(model, "resources", SimpleNamespace(files=lambda package: tmp_path / "weights"))
    result = run(str(small_slide), "-o", str(tmp_path / "n.geojson"))
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert "-m" in line and "default model" in line
    assert not list(tmp_path.glob("n.*"))  # nothing written before the model was found


def test_a_slide_without_mpp_asks_for_slide_mpp(tmp_path: Path, dark_model: Path) -> None:
    import cv2
    import numpy as np

    image = tmp_path / "patch.png"
    cv2.imwrite(str(image), np.full((128, 128, 3), 200, np.uint8))
    result = run(str(image), "-o", str(tmp_path / "n.geojson"), "-m", str(dark_model), "--scheduler", "sync")
    assert result.exit_code == 1
    (line,) = error_lines(result.output)
    assert "--slide-mpp" in line


@pytest.mark.slow
def test_runs_on_a_dask_cluster_at_an_address(tmp_path: Path, small_slide: Path, dark_model: Path) -> None:
    """Two worker processes on loopback, started and stopped here; same GeoJSON as in-process."""
    from distributed import LocalCluster

    common = ["-m", str(dark_model), "--tile", "128", "--device", "cpu"]
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        remote = run(
            str(small_slide),
            "-o",
            str(tmp_path / "a.geojson"),
            "--scheduler",
            cluster.scheduler_address,
            *common,
        )
    assert remote.exit_code == 0, remote.output
    local = run(str(small_slide), "-o", str(tmp_path / "b.geojson"), "--scheduler", "sync", *common)
    assert local.exit_code == 0, local.output
    assert len(load_features(tmp_path / "a.geojson")) > 5
    assert (tmp_path / "a.geojson").read_bytes() == (tmp_path / "b.geojson").read_bytes()


@pytest.fixture(scope="module")
def calibrated_dark_model(tmp_path_factory: pytest.TempPathFactory, dark_model: Path) -> Path:
    """The dark model with an int8 calibration, so that segment runs it in int8 (--precision auto)."""
    from synthetic import synthetic_he

    from wsiuda.models import Segmenter, save_model

    segmenter = Segmenter.load(dark_model, device="cpu")
    meta = segmenter.calibrated_meta([synthetic_he((128, 128), seed=seed) for seed in range(3)])
    path = tmp_path_factory.mktemp("models") / "dark-int8.pt"
    save_model(path, segmenter.network, meta)
    return path


@pytest.mark.parametrize("variant", ["float32, no CRF", "int8, CRF"])
def test_one_local_worker_runs_in_this_process(
    tmp_path: Path,
    small_slide: Path,
    dark_model: Path,
    calibrated_dark_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    variant: str,
) -> None:
    """One local worker runs in this process, a task per core sharing the cores; same GeoJSON as sync.

    In int8 the tasks' forward passes run side by side and the CRF runs in a helper process."""
    import os

    import distributed

    from wsiuda.pipelines import crf_helper
    from wsiuda.pipelines.segment import tasks

    made: list[bool] = []
    network_slots: list[int] = []
    in_helper: list[bool] = []

    def recording_cluster(**kwargs: object) -> distributed.LocalCluster:
        made.append(bool(kwargs["processes"]))
        return distributed.deploy.local.LocalCluster(**kwargs)  # type: ignore[arg-type]

    def recording_slots(count: int) -> object:
        network_slots.append(count)
        return real_slots(count)

    def recording_result(self: crf_helper.PendingCrf) -> object:
        in_helper.append(self._future is not None)
        return real_result(self)

    real_slots, real_result = tasks.forward_slots, crf_helper.PendingCrf.result
    monkeypatch.setattr(distributed, "LocalCluster", recording_cluster)
    monkeypatch.setattr(tasks, "forward_slots", recording_slots)
    monkeypatch.setattr(crf_helper.PendingCrf, "result", recording_result)
    model = calibrated_dark_model if variant.startswith("int8") else dark_model
    common = ["-m", str(model), "--tile", "128", "--device", "cpu"]
    common += ["--no-crf"] if "no CRF" in variant else []
    local = run(str(small_slide), "-o", str(tmp_path / "a.geojson"), "--workers", "1", *common)
    assert local.exit_code == 0, local.output
    assert made == [False]
    summary = json.loads((tmp_path / "a.summary.json").read_text())
    assert summary["run"]["precision"] == variant.split(",")[0]
    cores = os.cpu_count() or 1
    assert summary["run"]["threads_per_worker"] == cores
    if variant.startswith("int8") and cores > 1:
        assert network_slots and set(network_slots) == {cores}  # every task's pass beside the others
        assert in_helper and all(in_helper)  # every tile's CRF in a helper process
    else:
        assert network_slots and set(network_slots) == {1}
        assert not in_helper  # no CRF
    sync = run(str(small_slide), "-o", str(tmp_path / "b.geojson"), "--scheduler", "sync", *common)
    assert sync.exit_code == 0, sync.output
    assert len(load_features(tmp_path / "a.geojson")) > 5
    assert (tmp_path / "a.geojson").read_bytes() == (tmp_path / "b.geojson").read_bytes()


def test_the_local_cluster_listens_on_loopback_only_and_never_on_port_8787(
    tmp_path: Path, small_slide: Path, dark_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheduler serves HTTP whatever its dashboard: left to itself, on port 8787 of every interface, so a
    second run at the same time warned that the port was taken, and the slide's machine was reachable."""
    import warnings

    import distributed
    import psutil

    def listening() -> set[tuple[str, int]]:
        return {
            (connection.laddr.ip, connection.laddr.port)
            for connection in psutil.Process().net_connections(kind="inet")
            if connection.status == psutil.CONN_LISTEN
        }

    before = listening()
    opened: set[tuple[str, int]] = set()
    real_cluster = distributed.deploy.local.LocalCluster

    def recording_cluster(**kwargs: object) -> distributed.LocalCluster:
        cluster = real_cluster(**kwargs)  # type: ignore[arg-type]
        opened.update(listening() - before)
        return cluster

    monkeypatch.setattr(distributed, "LocalCluster", recording_cluster)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(
            str(small_slide), "-o", str(tmp_path / "n.geojson"), "-m", str(dark_model), "--workers", "1"
        )
    assert result.exit_code == 0, result.output
    assert opened, "the cluster opened no socket to check"
    assert all(host == "127.0.0.1" and port != 8787 for host, port in opened), opened
    assert not [warning for warning in caught if "already in use" in str(warning.message)]


@pytest.mark.parametrize(("option", "downsample"), [([], 2.5), (["--crf-downsample", "1.5"], 1.5)])
def test_the_crf_grid_the_run_used_is_recorded(
    tmp_path: Path, small_slide: Path, dark_model: Path, option: list[str], downsample: float
) -> None:
    """The default CRF grid, or a fractional one from --crf-downsample, is what the saved settings hold."""
    import yaml

    result = run(str(small_slide), "-o", str(tmp_path / "a.geojson"), "-m", str(dark_model),
                 "--scheduler", "sync", "--tile", "128", *option)  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "a.segment.yaml").read_text())
    assert saved["config"]["crf_params"]["downsample"] == downsample


def test_an_unreachable_scheduler_is_one_line(tmp_path: Path, small_slide: Path, dark_model: Path) -> None:
    import dask
    import distributed  # noqa: F401 -- its defaults join dask's config first, or leaving the block drops them

    args = [str(small_slide), "-o", str(tmp_path / "n.geojson"), "-m", str(dark_model)]
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        result = run(*args, "--scheduler", "tcp://127.0.0.1:9")
    assert result.exit_code == 2
    assert "scheduler" in error_lines(result.output)[0]


def test_a_scheduler_that_is_no_address_is_one_line(
    tmp_path: Path, small_slide: Path, dark_model: Path
) -> None:
    result = run(
        str(small_slide), "-o", str(tmp_path / "n.geojson"), "-m", str(dark_model), "--scheduler", "foo"
    )
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert "--scheduler foo" in line and "tcp://" in line


@pytest.mark.parametrize("option", ["--mpp", "--slide-mpp", "--nuclei-mpp"])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_a_number_that_is_not_finite_is_refused(
    tmp_path: Path, small_slide: Path, dark_model: Path, option: str, value: str
) -> None:
    result = run(str(small_slide), "-o", str(tmp_path / "n.geojson"), "-m", str(dark_model), option, value)
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith("Error:") and value in line
    assert not list(tmp_path.glob("n.*"))


@pytest.mark.realdata
def test_cmu1_segments_end_to_end(shared: Path, tmp_path: Path, dark_model: Path) -> None:
    """The real 20x SVS in this process, CRF on, at 2 µm/px so it stays quick."""
    slide = shared_file(shared, "slides/CMU-1-Small-Region.svs")
    out = tmp_path / "cmu1.geojson"
    result = run(
        str(slide),
        "-o",
        str(out),
        "-m",
        str(dark_model),
        "--mpp",
        "2.0",
        "--tile",
        "256",
        "--scheduler",
        "sync",
    )
    assert result.exit_code == 0, result.output
    features = load_features(out)
    assert len(features) > 20
    for item in features:
        check_qupath_detection(item)
    summary = json.loads((tmp_path / "cmu1.summary.json").read_text())
    assert summary["nuclei"] == len(features) and summary["crf"] is True


@pytest.mark.slow
@pytest.mark.realdata
def test_cmu1_segments_end_to_end_on_a_local_cluster(shared: Path, tmp_path: Path, dark_model: Path) -> None:
    """The real 20x SVS through the default local cluster (two worker processes) with the CRF on.

    The darkness U-Net stands in for a trained model; --mpp 1 keeps it fast (the coordinates must still be
    level-0 pixels of the slide).
    """
    slide = shared_file(shared, "slides/CMU-1-Small-Region.svs")
    out = tmp_path / "cmu1.geojson.gz"
    result = run(
        str(slide), "-o", str(out), "-m", str(dark_model), "--mpp", "1.0", "--tile", "256", "--workers", "2"
    )
    assert result.exit_code == 0, result.output
    features = load_features(out)
    assert len(features) > 100
    xs = [x for f in features for x, _ in f["geometry"]["coordinates"][0]]
    ys = [y for f in features for _, y in f["geometry"]["coordinates"][0]]
    assert min(xs) >= 0 and max(xs) <= 2220 and min(ys) >= 0 and max(ys) <= 2967
    assert max(xs) > 1500 and max(ys) > 2000  # spread over the slide, not squeezed into the working grid
    summary = json.loads((tmp_path / "cmu1.summary.json").read_text())
    assert summary["nuclei"] == len(features)
    assert summary["crf"] is True and summary["timings_s"]["crf"] > 0
    assert summary["slide"]["mpp"] == pytest.approx(0.499, abs=1e-3)
    assert os.path.getsize(tmp_path / "cmu1.overlay.png") > 10_000


def test_a_nuclei_grid_off_the_working_grid_is_one_line(
    tmp_path: Path, small_slide: Path, dark_model: Path
) -> None:
    from wsiuda.pipelines.segment import SegmentConfig

    result = run(
        str(small_slide), "-o", str(tmp_path / "n.geojson"), "-m", str(dark_model), "--nuclei-mpp", "0.3"
    )
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert "--nuclei-mpp 0.3" in line and "0.25" in line
    assert not (tmp_path / "n.geojson").exists()
    config = SegmentConfig(inputs=("s.svs",), output="n.geojson")
    assert (
        config.nuclei_factor(0.25) == 2 and config.nuclei_factor(0.5) == 1 and config.nuclei_factor(1.0) == 1
    )
    assert SegmentConfig(inputs=("s.svs",), output="n.geojson", nuclei_mpp=0.75).nuclei_factor(0.25) == 3


def test_the_smallest_tile_is_the_same_for_the_command_and_the_config(tmp_path: Path) -> None:
    from wsiuda.errors import ConfigError
    from wsiuda.pipelines.segment import SegmentConfig

    output = str(tmp_path / "n.geojson")
    refused = run("slide.svs", "-o", output, "--tile", "63")
    assert refused.exit_code == 2 and "x>=64" in refused.output
    with pytest.raises(ConfigError, match="at least 64"):
        SegmentConfig(inputs=("slide.svs",), output=output, tile=63)
    assert SegmentConfig(inputs=("slide.svs",), output=output, tile=64).tile == 64
