"""Ctrl-C and SIGTERM: one line that says what is kept and how to go on, from the command and from none of
the worker processes it started; a rerun then finishes the slide. A command killed outright leaves no
process of its own behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_segment import save_dark_model, write_slide

from wsiuda.cli.main import INTERRUPTED_EXIT_CODE, TERMINATED_EXIT_CODE

SCRIPT = Path(sys.executable).parent / "wsiuda"


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synthetic import synthetic_he

    # 3 x 3 tiles of 512 px: a run long enough to be interrupted between its first tile and its last.
    image = synthetic_he((1536, 1536), seed=11)
    return write_slide(tmp_path_factory.mktemp("slides") / "slide.svs", image, mpp=0.25, app_mag=40)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_dark_model(tmp_path_factory.mktemp("models") / "dark.pt")


def _start_until_first_tile(command: list[str], store: Path) -> subprocess.Popen[str]:
    """``command`` started in a process group of its own, once the mask store has its first finished tile."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    done = store / "done" / "c"
    deadline = time.monotonic() + 120
    while not (done.is_dir() and any(done.rglob("*"))):
        if process.poll() is not None or time.monotonic() > deadline:
            output, _ = process.communicate()
            pytest.fail(f"the run ended or stalled before its first tile:\n{output}")
        time.sleep(0.05)
    return process


def _interrupt_after_first_tile(
    command: list[str], store: Path, how: signal.Signals = signal.SIGINT
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` and send ``how`` to its whole process group, as a terminal's Ctrl-C (SIGINT) or a
    batch scheduler (SIGTERM) does, once the mask store has its first finished tile."""
    process = _start_until_first_tile(command, store)
    os.killpg(process.pid, how)
    output, _ = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, output)


@pytest.mark.parametrize(
    ("how", "workers"),
    [
        pytest.param(signal.SIGINT, 1, id="Ctrl-C, in-process with CRF helpers"),
        pytest.param(signal.SIGINT, 2, id="Ctrl-C, worker processes", marks=pytest.mark.slow),
        pytest.param(signal.SIGTERM, 1, id="SIGTERM, in-process with CRF helpers"),
    ],
)
def test_a_stop_during_segment_is_one_line_and_a_rerun_finishes(
    tmp_path: Path, slide: Path, model: Path, how: signal.Signals, workers: int
) -> None:
    out = tmp_path / "n.geojson"
    command = [str(SCRIPT), "segment", str(slide), "-o", str(out), "-m", str(model), "--tile", "512"]
    command += ["--workers", str(workers)]
    stopped = _interrupt_after_first_tile(command, tmp_path / "n.mask.zarr", how)
    if stopped.returncode == 0:
        pytest.skip("the run finished before the signal reached it")
    word, code = (
        ("Terminated", TERMINATED_EXIT_CODE)
        if how == signal.SIGTERM
        else ("Interrupted", INTERRUPTED_EXIT_CODE)
    )
    assert stopped.returncode == code, stopped.stdout
    assert stopped.stdout.strip().splitlines() == [
        f"{word}; finished tiles are kept: run the same command again to go on."
    ]
    assert not out.exists()

    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr and out.exists()


@pytest.mark.parametrize("command_name", ["segment", "tile"])
def test_a_killed_command_leaves_none_of_its_processes_behind(
    tmp_path: Path, slide: Path, model: Path, command_name: str
) -> None:
    """SIGKILL to the command alone: its CRF helpers or tile workers, and their fork server, end too."""
    import psutil

    if command_name == "segment":
        command = [str(SCRIPT), "segment", str(slide), "-o", str(tmp_path / "n.geojson"), "-m", str(model)]
        command += ["--tile", "512"]
        process = _start_until_first_tile(command, tmp_path / "n.mask.zarr")
    else:
        command = [str(SCRIPT), "tile", str(slide), "-o", str(tmp_path / "tiles")]
        command += ["--tile", "32", "--workers", "2"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        deadline = time.monotonic() + 60
        while len(psutil.Process(process.pid).children(recursive=True)) < 3:  # the server and 2 workers
            assert process.poll() is None and time.monotonic() < deadline, "the workers never started"
            time.sleep(0.05)
    descendants = psutil.Process(process.pid).children(recursive=True)
    assert descendants, "the command started no process to check"
    process.kill()
    process.wait()
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, [" ".join(p.cmdline())[:100] for p in alive]


def test_crf_helpers_leave_ctrl_c_to_the_worker() -> None:
    from wsiuda.pipelines import crf_helper

    try:
        helper = crf_helper._helper(1)
        assert helper is not None
        dispositions = [
            helper.submit(signal.getsignal, name).result() for name in (signal.SIGINT, signal.SIGTERM)
        ]
    finally:
        crf_helper.shutdown_helper()
    assert dispositions == [signal.SIG_IGN, signal.SIG_IGN]


def test_tile_worker_processes_leave_ctrl_c_to_the_command() -> None:
    from wsiuda.pipelines.tile import start_pool

    pool = start_pool(2)
    assert pool is not None
    try:
        dispositions = {
            pool.submit(signal.getsignal, name).result()
            for name in (signal.SIGINT, signal.SIGTERM)
            for _ in range(4)
        }
    finally:
        pool.shutdown()
    assert dispositions == {signal.SIG_IGN}


def test_local_cluster_worker_processes_leave_ctrl_c_to_the_command(tmp_path: Path) -> None:
    from wsiuda.pipelines.segment import SegmentConfig
    from wsiuda.pipelines.segment.cluster import cluster_client

    config = SegmentConfig(inputs=("slide.svs",), output=str(tmp_path / "out"), workers=2)
    environment = dict(os.environ)
    with cluster_client(config) as client:
        dispositions = client.run(signal.getsignal, signal.SIGINT)
        threads = client.run(os.environ.get, "OMP_NUM_THREADS")
    assert len(dispositions) == 2
    assert set(dispositions.values()) == {signal.SIG_IGN}
    assert set(threads.values()) == {"1"}  # the workers got their settings...
    assert dict(os.environ) == environment  # ...and this process kept its own
