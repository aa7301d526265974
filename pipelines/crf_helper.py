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

A helper can also go on with what follows the CRF (:class:`PendingCrf`'s ``then``). The segment pipeline
hands it a tile's nuclei, outlines and store write: Python-heavy work that, run in the worker, holds the
GIL that the other task's forward pass needs between its operations. On the 100-tile generated slide of
benchmarks/segment_throughput.py that made a run 0.3-1.2 s shorter in each of 3 alternating rounds
(28.2, 28.8 and 29.5 s against 28.7, 29.1 and 30.7 s, timed by hand).
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from wsiuda.allocator import reuse_freed_memory
from wsiuda.crf import CrfParams, crf_on_grid, dense_crf, from_crf_grid, to_crf_grid
from wsiuda.pipelines.worker_setup import serve_the_command, start_fork_server, stop_fork_server

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
    thread.

    With ``then``, :meth:`result` is ``then(refined, *arguments)`` instead of the refined probability, and a
    helper runs ``then`` too, right after the CRF: the work after the CRF then runs in the helper's own
    process and GIL, not beside the worker's forward passes (``then`` and ``arguments`` must pickle).
    """

    def __init__(
        self,
        image: np.ndarray,
        probability: np.ndarray,
        params: CrfParams,
        *,
        helpers: int = 1,
        then: Callable[..., Any] | None = None,
        arguments: tuple[Any, ...] = (),
    ) -> None:
        self._arguments = (image, probability, params)
        self._shape = probability.shape
        self._then = then, arguments
        helper = _helper(helpers) if helpers > 0 else None
        self._future: Future[Any] | None = None
        if helper is not None:
            try:
                if params.uncertain_margin is None:
                    # The helper gets the CRF's own coarser grid (a sixth of the bytes by default), and
                    # returns it unless it goes on with ``then``: pickling whole crops through the pipe
                    # cost a tile ~60 ms of CPU (timed by hand).
                    coarse = to_crf_grid(image, probability, params)
                    self._future = helper.submit(
                        _crf_on_grid_then, *coarse, params, self._shape, then, arguments
                    )
                else:
                    self._future = helper.submit(_dense_crf_then, image, probability, params, then, arguments)
            except (BrokenProcessPool, OSError):  # died, or could not start (submit starts a helper)
                _helper_died()

    def result(self) -> Any:
        if self._future is not None:
            try:
                outcome = self._future.result()
            except BrokenProcessPool:
                _helper_died()
            else:
                on_grid = self._then[0] is None and self._arguments[2].uncertain_margin is None
                return from_crf_grid(outcome, self._shape) if on_grid else outcome
        return _dense_crf_then(*self._arguments, *self._then)


def _crf_on_grid_then(
    image: np.ndarray,
    probability: np.ndarray,
    params: CrfParams,
    shape: tuple[int, int],
    then: Callable[..., Any] | None,
    arguments: tuple[Any, ...],
) -> Any:
    """In a helper: the CRF on its grid, returned as it is, or brought back to ``shape`` for ``then``."""
    refined = crf_on_grid(image, probability, params)
    return refined if then is None else then(from_crf_grid(refined, shape), *arguments)


def _dense_crf_then(
    image: np.ndarray,
    probability: np.ndarray,
    params: CrfParams,
    then: Callable[..., Any] | None,
    arguments: tuple[Any, ...],
) -> Any:
    refined = dense_crf(image, probability, params)
    return refined if then is None else then(refined, *arguments)


def start_helpers(helpers: int, *, preload: Sequence[str] = ()) -> Future[None]:
    """Start this process's helpers now, without waiting for them: they import the CRF's libraries, and
    the modules named in ``preload`` (what the ``then`` steps will need), while this process goes on.

    Returns a future that is done once every helper is up (at once for ``helpers`` < 1 or where this
    process may have no helpers). Where a helper cannot start, the CRF finds out when it asks for one.
    """
    started: Future[None] = Future()
    helper = _helper(helpers, preload=preload) if helpers > 0 else None
    if helper is None:
        started.set_result(None)
        return started

    def start() -> None:
        # Starting a helper waits for the fork server to have imported the libraries (about half a
        # second): this thread waits for it, not the caller.
        try:
            loads = [helper.submit(_load_libraries, tuple(preload)) for _ in range(helpers)]
            for load in loads:  # each submit starts a helper while none is idle
                load.result()
        except Exception as error:  # whatever it is, the CRF meets it again and reports it
            log.debug("CRF helpers did not start: %s", error)
        finally:
            started.set_result(None)

    threading.Thread(target=start, name="crf-helpers-start", daemon=True).start()
    return started


def _start_helper(command_pid: int) -> None:
    reuse_freed_memory()
    serve_the_command(command_pid)


def _load_libraries(modules: tuple[str, ...]) -> None:
    for module in (*CRF_LIBRARIES, *modules):
        importlib.import_module(module)


def shutdown_helper() -> None:
    """Stop this process's helpers (the next CRF starts new ones); a CRF still running in one is lost."""
    global _HELPER
    with _HELPER_LOCK:
        helper, _HELPER = _HELPER, None
    if helper is None:
        return
    # Killed rather than asked to exit: a helper's interpreter unloading its libraries at exit added
    # 0.12-0.15 s to the end of every run (timed by hand), and a helper holds nothing to save. (Python 3.14
    # has ProcessPoolExecutor.kill_workers; before it, the pool's processes are its private _processes.)
    processes = getattr(helper, "_processes", None) or {}
    for process in list(processes.values()):
        process.kill()
    helper.shutdown(wait=True, cancel_futures=True)
    stop_fork_server()


def _helper_died() -> None:
    global _DISABLED
    if not _DISABLED:
        log.warning("the CRF helper process died; running the CRF in the worker from now on")
    _DISABLED = True
    shutdown_helper()


CRF_LIBRARIES = ("numpy", "cv2", "pydensecrf.densecrf")


def _helper(helpers: int, *, preload: Sequence[str] = ()) -> ProcessPoolExecutor | None:
    global _HELPER
    if _DISABLED or multiprocessing.current_process().daemon:  # daemonic processes may not have children
        return None
    with _HELPER_LOCK:
        if _HELPER is None:
            context = _context(preload)
            if context.get_start_method() == "forkserver":
                start_fork_server()
            _HELPER = ProcessPoolExecutor(
                max_workers=max(1, helpers),
                mp_context=context,
                initializer=_start_helper,
                initargs=(os.getpid(),),
            )
        return _HELPER


def _context(preload: Sequence[str]) -> multiprocessing.context.BaseContext:
    """Helpers are forked from a fork server, not from this process: a forked copy of a worker would carry
    torch's thread pools and the model. The server imports the libraries once and each helper is a fork
    of it. Spawned, each helper imported them itself: two helpers starting together beside a worker that
    imports torch took 3 processes' work onto 2 cores, and the worker reached its first tile 0.3-0.4 s
    later than without them (timed by hand on CMU-1-Small-Region). Where there is no fork server
    (Windows) they are spawned.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Only third-party modules: the server does not get this process's sys.path (Python 3.11) and could
    # import another `wsiuda` (see pipelines/tile.py); each helper imports wsiuda's own once forked. The
    # list takes effect where this process has not started its fork server yet.
    third_party = [module for module in preload if module.split(".")[0] != "wsiuda"]
    context.set_forkserver_preload([*CRF_LIBRARIES, *third_party])
    return context
