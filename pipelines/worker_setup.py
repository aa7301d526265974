"""What each worker process of a local `wsiuda segment` cluster sets up as it starts.

The cluster names this module in ``distributed.worker.preload``: Dask imports it in every worker process
and calls :func:`dask_setup`. The workers' malloc settings travel in their environment instead, since glibc
reads them as a process starts (:mod:`wsiuda.allocator`).
"""

from __future__ import annotations

from typing import Any

from wsiuda.allocator import collect_garbage_less_often


def dask_setup(worker: Any) -> None:
    """Called by Dask in a new worker process, before it runs a task."""
    collect_garbage_less_often()
