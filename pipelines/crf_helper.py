"""The dense CRF in a helper process, so that it does not stall the rest of a segment worker.

pydensecrf holds the GIL for the whole of its inference. In a worker that runs one task in the network and
another in the CRF at the same time, that stops the network's Python code, and with it the forward pass,
for as long as the CRF runs: on two cores a tile's forward pass took 135 s beside a CRF loop against 3.7 s
alone (timed by hand). A helper process has a GIL of its own. It imports only numpy, OpenCV and pydensecrf
(no torch, no model), so it costs tens of MB. A tile's crop travels to it and back through a pipe on the
CRF's own (coarser) grid.

Each worker process starts its helpers the first time it needs them and keeps them: one per task that
runs at once, so that two tasks reaching the CRF together do not queue for one helper while a core idles
(timed by hand on CMU-1-Small-Region end to end, 2 cores, when a run took about 50 s: 49.1 and 49.3 s with
two helpers, 51.6 and 51.2 s with one).
:func:`start_helpers` starts them ahead: the segment pipeline does so where its tasks run in its own
process, while torch is imported and the model loaded on one core and the other idles, and
benchmarks/segment_throughput.py does so to keep the helpers' start out of its clock.
Where a process may not start children (a daemonic worker of someone else's cluster), or a helper dies,
the CRF runs in the calling thread, as it would without the helpers.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from wsiuda.allocator import reuse_freed_memory
from wsiuda.crf import CrfParams, crf_on_grid, dense_crf, from_crf_grid, to_crf_grid
from wsiuda.pipelines.worker_setup import leave_interrupts_to_the_parent

log = logging.getLogger(__name__)

_HELPER: ProcessPoolExecutor | None = None
_HELPER_LOCK = threading.Lock()
_DISABLED = False
"""Set once a helper has died in this process: the CRF then stays in the calling thread."""


def crf_in_helper(
    image: np.ndarray, probability: np.ndarray, params: CrfParams, *, helpers: int = 1
) -> np.ndarray:
    """:func:`wsiuda.crf.dense_crf`, run in one of this process's helpers where it can have them.

    ``helpers`` is how many CRFs may run at once; the first call's value sizes the pool for the process.
    """
    return PendingCrf(image, probability, params, helpers=helpers).result()


class PendingCrf:
    """A CRF started in one of ``helpers`` helpers (where this process can have them; 0: none), so that
    the caller can go on until :meth:`result`. Without a helper it runs in :meth:`result`, in the calling
    thread."""

    def __init__(
        self, image: np.ndarray, probability: np.ndarray, params: CrfParams, *, helpers: int = 1
    ) -> None:
        self._arguments = (image, probability, params)
        self._shape = probability.shape
        helper = _helper(helpers) if helpers > 0 else None
        self._future: Future[np.ndarray] | None = None
        if helper is not None:
            try:
                if params.uncertain_margin is None:
                    # The helper gets and returns the CRF's own coarser grid (a sixth of the bytes by
                    # default): pickling whole crops through the pipe cost a tile ~60 ms of CPU (timed by
                    # hand).
                    coarse = to_crf_grid(image, probability, params)
                    self._future = helper.submit(crf_on_grid, *coarse, params)
                else:
                    self._future = helper.submit(dense_crf, image, probability, params)
            except BrokenProcessPool:
                _helper_died()

    def result(self) -> np.ndarray:
        if self._future is not None:
            try:
                refined = self._future.result()
            except BrokenProcessPool:
                _helper_died()
            else:
                return from_crf_grid(refined, self._shape)
        return dense_crf(*self._arguments)


def start_helpers(helpers: int) -> None:
    """Start this process's helpers now, without waiting for them: they import the CRF's libraries while
    this process goes on (none for ``helpers`` < 1)."""
    if helpers < 1:
        return
    helper = _helper(helpers)
    if helper is not None:
        for _ in range(helpers):
            helper.submit(_load_crf_library)  # each submit starts a helper while none is idle


def _start_helper() -> None:
    reuse_freed_memory()
    leave_interrupts_to_the_parent()


def _load_crf_library() -> None:
    import pydensecrf.densecrf  # noqa: F401


def shutdown_helper() -> None:
    """Stop this process's helpers (the next CRF starts new ones)."""
    global _HELPER
    with _HELPER_LOCK:
        helper, _HELPER = _HELPER, None
    if helper is not None:
        helper.shutdown(wait=True)


def _helper_died() -> None:
    global _DISABLED
    if not _DISABLED:
        log.warning("the CRF helper process died; running the CRF in the worker from now on")
    _DISABLED = True
    shutdown_helper()


def _helper(helpers: int) -> ProcessPoolExecutor | None:
    global _HELPER
    if _DISABLED or multiprocessing.current_process().daemon:  # daemonic processes may not have children
        return None
    with _HELPER_LOCK:
        if _HELPER is None:
            # spawn, not fork: a forked copy of a worker would carry torch's thread pools and the model.
            _HELPER = ProcessPoolExecutor(
                max_workers=max(1, helpers),
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_helper,
            )
        return _HELPER
