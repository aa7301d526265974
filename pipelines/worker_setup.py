"""What the worker processes that wsiuda starts set up as they start.

A local `wsiuda segment` cluster names this module in ``distributed.worker.preload``: Dask imports it in
every worker process and calls :func:`dask_setup`. The workers' malloc settings travel in their environment
instead, since glibc reads them as a process starts (:mod:`wsiuda.allocator`).
"""

from __future__ import annotations

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
