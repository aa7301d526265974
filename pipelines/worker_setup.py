"""What the worker processes that wsiuda starts set up as they start, and how their fork server ends.

A local `wsiuda segment` cluster names this module in ``distributed.worker.preload``: Dask imports it in
every worker process and calls :func:`dask_setup`. The workers' malloc settings travel in their environment
instead, since glibc reads them as a process starts (:mod:`wsiuda.allocator`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from wsiuda.allocator import collect_garbage_less_often


def dask_setup(worker: Any) -> None:
    """Called by Dask in a new worker process, before it runs a task."""
    collect_garbage_less_often()
    leave_interrupts_to_the_parent()


def leave_interrupts_to_the_parent() -> None:
    """Ignore Ctrl-C in a pool's worker process.

    A terminal sends Ctrl-C's SIGINT to every process of the command, so without this each worker dies
    with a traceback of its own while the parent reports the interruption and stops the pool; a worker
    that ignores it finishes its current write (each is atomic) and exits with the pool.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_fork_server() -> None:
    """Kill this process's multiprocessing fork server, if it has one; the next process it is asked for
    starts another. Call it once the pools forked from it are shut down (CRF helpers, `wsiuda tile`'s
    workers).

    Left to itself it ends when this process does, unloading its libraries first, and until then it holds
    this process's stdout and stderr open: a caller reading them waited 0.06-0.08 s past the end of a
    segment or tile run for it (timed by hand). multiprocessing keeps the server's pid in a private
    attribute, and reaps and restarts a server that has died when it next needs one.
    """
    from multiprocessing import forkserver

    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError, ChildProcessError):
        os.kill(pid, signal.SIGKILL)
        # Until it has died, but not reaped (WNOWAIT): multiprocessing reaps it, and a process started
        # before it had died would have been sent to it. (Where there is no waitid, as on macOS, such a
        # start fails: a CRF then runs in the caller.)
        if hasattr(os, "waitid"):
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
