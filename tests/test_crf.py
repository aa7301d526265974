"""Dense CRF refinement: parameters, what it does to a noisy probability map, and its faster modes."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

from wsiuda.crf import CrfParams, crf_reach_px, dense_crf
from wsiuda.errors import ConfigError


def scene(size: int = 160, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An H&E-like image of dark disks on pink, the true mask, and a noisy, blurred probability map."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((size, size), np.uint8)
    for cy, cx, r in ((40, 40, 14), (45, 110, 18), (115, 60, 16), (120, 125, 12)):
        cv2.circle(truth, (cx, cy), r, 1, thickness=-1)
    image = np.where(truth[..., None] == 1, np.array([80, 50, 130]), np.array([235, 175, 205])).astype(
        np.uint8
    )
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    blurred = cv2.GaussianBlur(truth.astype(np.float32), (0, 0), 4)
    probability = np.clip(0.15 + 0.7 * blurred + rng.normal(0, 0.18, truth.shape), 0, 1).astype(np.float32)
    return image, truth.astype(bool), probability


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_defaults_are_the_papers_group_parameters() -> None:
    params = CrfParams()
    assert (params.w1, params.theta_alpha, params.theta_beta) == (10.0, 20.0, 13.0)
    assert (params.w2, params.theta_gamma, params.iterations) == (3.0, 3.0, 5)
    assert crf_reach_px(params) == 60  # 3 sigma of the widest kernel


@pytest.mark.parametrize(
    "kwargs",
    [
        {"w1": -1},
        {"theta_alpha": 0},
        {"theta_beta": -2},
        {"iterations": 0},
        {"downsample": 0},
        {"uncertain_margin": 0.7},
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        CrfParams(**kwargs)  # type: ignore[arg-type]


def test_crf_cleans_a_noisy_probability_map() -> None:
    image, truth, probability = scene()
    refined = dense_crf(image, probability, CrfParams())
    assert refined.shape == probability.shape and refined.dtype == np.float32
    assert refined.min() >= 0.0 and refined.max() <= 1.0
    before, after = dice(probability > 0.5, truth), dice(refined > 0.5, truth)
    assert after > before + 0.03, (before, after)
    assert after > 0.95


def test_crf_rejects_mismatched_inputs() -> None:
    image, _, probability = scene()
    with pytest.raises(ValueError):
        dense_crf(image[:-1], probability, CrfParams())
    with pytest.raises(ValueError):
        dense_crf(image.astype(np.float32), probability, CrfParams())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fast", "allowed_loss"),
    [
        (CrfParams(downsample=2), 0.05),
        (CrfParams(downsample=2.5), 0.07),  # the default's grid: radius 5-7 px there
        (CrfParams(uncertain_margin=0.3, block=64), 0.005),
    ],
)
def test_fast_modes_score_close_to_the_full_crf(fast: CrfParams, allowed_loss: float) -> None:
    """Dice against the truth; on these small disks (radius 12-18 px) half resolution costs the most."""
    image, truth, probability = scene()
    full = dice(dense_crf(image, probability, CrfParams()) > 0.5, truth)
    faster = dice(dense_crf(image, probability, fast) > 0.5, truth)
    assert faster >= full - allowed_loss, (full, faster)
    assert faster > dice(probability > 0.5, truth) + 0.03


def pydensecrf_with_both_kernels(image: np.ndarray, probability: np.ndarray, params: CrfParams) -> np.ndarray:
    """The CRF as pydensecrf runs it on its own, both kernels on its lattice (full resolution)."""
    import pydensecrf.densecrf as dcrf

    height, width = probability.shape
    foreground = np.clip(probability, 1e-5, 1 - 1e-5)
    crf = dcrf.DenseCRF2D(width, height, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.stack([1 - foreground, foreground]).reshape(2, -1))))
    crf.addPairwiseGaussian(sxy=params.theta_gamma, compat=params.w2)
    crf.addPairwiseBilateral(
        sxy=params.theta_alpha, srgb=params.theta_beta, rgbim=np.ascontiguousarray(image), compat=params.w1
    )
    return np.asarray(crf.inference(params.iterations), np.float32)[1].reshape(height, width)


@pytest.mark.parametrize(
    ("params", "smoothness_counts"),
    [(CrfParams(), False), (CrfParams(w1=1.0, iterations=2), True), (CrfParams(w1=0.0, w2=10.0), True)],
)
def test_the_smoothness_kernel_filters_as_pydensecrfs_own(params: CrfParams, smoothness_counts: bool) -> None:
    """The smoothness kernel runs as an OpenCV Gaussian between pydensecrf's steps; the labels agree with
    pydensecrf running both kernels itself (its lattice only approximates a Gaussian). Where the kernel
    counts (with the paper's w1=10 the appearance kernel decides this scene alone), leaving it out moves
    many times as many labels."""
    image, _, probability = scene(seed=3)
    ours = dense_crf(image, probability, params) > 0.5
    theirs = pydensecrf_with_both_kernels(image, probability, params) > 0.5
    disagree = float(np.mean(ours != theirs))
    assert disagree < 0.002
    if smoothness_counts:
        without = pydensecrf_with_both_kernels(image, probability, replace(params, w2=0.0)) > 0.5
        assert np.mean(without != theirs) > 10 * max(disagree, 1e-4)


def test_uncertain_mode_keeps_confident_blocks_as_they_are() -> None:
    image, _, probability = scene()
    confident = probability.copy()
    confident[:64, :64] = 0.02  # a block with no uncertain pixel
    refined = dense_crf(image, confident, CrfParams(uncertain_margin=0.3, block=64))
    np.testing.assert_array_equal(refined[:64, :64], confident[:64, :64])
    assert not np.array_equal(refined[64:, 64:], confident[64:, 64:])


def test_the_crf_helper_process_gives_the_worker_the_same_result() -> None:
    import os

    from wsiuda.pipelines import crf_helper

    image, _, probability = scene(seed=3)
    try:
        refined = crf_helper.crf_in_helper(image, probability, CrfParams(downsample=2))
        helper = crf_helper._HELPER
        assert helper is not None, "no helper process was started"
        pids = {process.pid for process in helper._processes.values()}
        assert pids and os.getpid() not in pids  # it ran in another process
    finally:
        crf_helper.shutdown_helper()
    np.testing.assert_array_equal(refined, dense_crf(image, probability, CrfParams(downsample=2)))
    assert crf_helper._HELPER is None


def test_the_crf_grid_repeats_every_few_pixels() -> None:
    from wsiuda.crf import crf_grid_period

    periods = {2.5: 5, 2.0: 2, 1.5: 3, 1.0: 1, 4.0: 4}
    assert {d: crf_grid_period(CrfParams(downsample=d)) for d in periods} == periods
    assert crf_grid_period(CrfParams(downsample=2.5, uncertain_margin=0.3)) == 1


def process_and_threshold(refined: np.ndarray, threshold: float) -> tuple[int, np.ndarray]:
    """A step after the CRF, as a helper would run it: where it ran, and the refined mask."""
    import os

    return os.getpid(), refined > threshold


@pytest.mark.parametrize("margin", [None, 0.3])
def test_a_step_after_the_crf_runs_in_the_helper_on_the_full_refined_crop(margin: float | None) -> None:
    import os

    from wsiuda.pipelines import crf_helper

    image, _, probability = scene(seed=8)
    params = CrfParams(downsample=2, uncertain_margin=margin, block=64)
    try:
        pid, mask = crf_helper.PendingCrf(
            image, probability, params, helpers=1, then=process_and_threshold, arguments=(0.5,)
        ).result()
    finally:
        crf_helper.shutdown_helper()
    assert pid != os.getpid()
    np.testing.assert_array_equal(mask, dense_crf(image, probability, params) > 0.5)
    # Without a helper, the step runs here on the same refined crop.
    here = crf_helper.PendingCrf(
        image, probability, params, helpers=0, then=process_and_threshold, arguments=(0.5,)
    )
    pid, mask_here = here.result()
    assert pid == os.getpid()
    np.testing.assert_array_equal(mask_here, mask)


def test_tasks_side_by_side_get_a_crf_helper_each() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from wsiuda.pipelines import crf_helper

    scenes = [scene(seed=seed) for seed in (4, 5)]
    params = CrfParams(downsample=2)
    try:
        with ThreadPoolExecutor(2) as tasks:
            refined = list(
                tasks.map(lambda s: crf_helper.crf_in_helper(s[0], s[2], params, helpers=2), scenes)
            )
        helper = crf_helper._HELPER
        assert helper is not None and helper._max_workers == 2
    finally:
        crf_helper.shutdown_helper()
    for (image, _, probability), result in zip(scenes, refined, strict=True):
        np.testing.assert_array_equal(result, dense_crf(image, probability, params))


def test_helpers_started_ahead_are_the_ones_the_crf_then_uses() -> None:
    from wsiuda.pipelines import crf_helper

    image, _, probability = scene(seed=6)
    params = CrfParams(downsample=2)
    try:
        up = crf_helper.start_helpers(2)  # returns without waiting for them
        up.result(timeout=120)
        helper = crf_helper._HELPER
        assert helper is not None and helper._max_workers == 2
        started = {process.pid for process in helper._processes.values()}
        assert len(started) == 2, "start_helpers should start one process per helper"
        refined = crf_helper.crf_in_helper(image, probability, params, helpers=2)
        assert crf_helper._HELPER is helper
        assert {process.pid for process in helper._processes.values()} == started
    finally:
        crf_helper.shutdown_helper()
    np.testing.assert_array_equal(refined, dense_crf(image, probability, params))


def test_helpers_start_again_after_a_shutdown_that_ended_their_fork_server() -> None:
    import multiprocessing.forkserver

    from conftest import process_ends

    from wsiuda.pipelines import crf_helper

    image, _, probability = scene(seed=9)
    params = CrfParams(downsample=2)
    try:
        first = crf_helper.crf_in_helper(image, probability, params)
        server = multiprocessing.forkserver._forkserver._forkserver_pid  # None without a fork server
        crf_helper.shutdown_helper()
        if "forkserver" in multiprocessing.get_all_start_methods():
            assert server is not None and process_ends(server), "the fork server outlived the shutdown"
        again = crf_helper.crf_in_helper(image, probability, params)
    finally:
        crf_helper.shutdown_helper()
    np.testing.assert_array_equal(again, first)


def test_a_crf_whose_helper_cannot_start_runs_in_the_caller(monkeypatch, caplog) -> None:
    from wsiuda.pipelines import crf_helper

    monkeypatch.setattr(crf_helper, "_DISABLED", False)  # restored after the test
    image, _, probability = scene(seed=8)
    params = CrfParams(downsample=2)

    def cannot_start(*args: object, **kwargs: object) -> None:
        raise OSError(24, "Too many open files")  # as starting a process can fail

    try:
        helper = crf_helper._helper(1)
        assert helper is not None
        monkeypatch.setattr(helper, "submit", cannot_start)
        with caplog.at_level("WARNING", logger=crf_helper.__name__):
            refined = crf_helper.PendingCrf(image, probability, params, helpers=1).result()
        assert "running the CRF in the worker" in caplog.text
        assert crf_helper._HELPER is None
    finally:
        crf_helper.shutdown_helper()
    np.testing.assert_array_equal(refined, dense_crf(image, probability, params))


def test_a_crf_whose_helper_died_runs_in_the_caller(monkeypatch, caplog) -> None:
    import os
    import signal

    from wsiuda.pipelines import crf_helper

    monkeypatch.setattr(crf_helper, "_DISABLED", False)  # restored after the test
    image, _, probability = scene(seed=7)
    params = CrfParams(downsample=2)
    try:
        crf_helper.start_helpers(1).result(timeout=120)
        helper = crf_helper._HELPER
        assert helper is not None
        for process in list(helper._processes.values()):
            os.kill(process.pid, signal.SIGKILL)
            process.join()
        with caplog.at_level("WARNING", logger=crf_helper.__name__):
            pending = crf_helper.PendingCrf(image, probability, params, helpers=1)
            refined = pending.result()
        assert "helper process died" in caplog.text
        assert crf_helper._HELPER is None, "the broken helper should be shut down"
        # From now on the CRF runs in the calling process, without starting new helpers.
        again = crf_helper.crf_in_helper(image, probability, params, helpers=1)
        assert crf_helper._HELPER is None
    finally:
        crf_helper.shutdown_helper()
    expected = dense_crf(image, probability, params)
    np.testing.assert_array_equal(refined, expected)
    np.testing.assert_array_equal(again, expected)
