"""How a long run's process holds memory: glibc's malloc set to keep what large arrays free for the next
ones, and Python's garbage collector set to run less often.

A tile's forward pass allocates and frees dozens of arrays of tens of MB, and the CRF and the nucleus steps
a few more. glibc serves each of them with fresh pages from the kernel: it maps arrays above its mmap
threshold on their own and unmaps them when freed, and a thread's own arena gives back the heap it no
longer uses. Every pass then pays a page fault for each 4 KiB it touches. On a 2-core AMD EPYC that was
48 thousand faults and 19% of a 1472² window's int8 forward pass (407 ms against 331 ms with freed
memory kept; benchmarks/results/segment_throughput.md).

:func:`reuse_freed_memory` makes glibc keep what is freed, in one heap shared by all threads, and serve
the next arrays from it: one arena (threads' arenas hand memory back as soon as a heap empties), no
separate mappings (those go back to the kernel on free), and no trimming of the heap's free top below
2 GiB. The process then holds its peak memory until it exits, which a batch tool's process may do. PyTorch's
CPU performance guide recommends jemalloc or TCMalloc for the same reason; these settings get the same
effect from the C library already loaded, with nothing to install.

A dense tile's outlines and GeoJSON make tens of thousands of small Python objects that live for
milliseconds. With Python's default thresholds the cyclic collector runs over a dozen times per tile, and
every few hundred runs it walks every object that torch, Dask and the model hold.
:func:`collect_garbage_less_often` raises the thresholds (:data:`GC_THRESHOLDS`); reference counting still
frees those objects at once, and cycles are still collected, later. On a 2-core AMD EPYC, a dense tile's
GeoJSON features took 8.2 ms instead of 33.3 (benchmarks/results/nuclei_steps.md); end to end, on the
100-tile generated slide and on CMU-1-Small-Region, the difference is within the machine's noise
(benchmarks/results/segment_throughput.md).

The console script applies both to its own process. The processes that `wsiuda segment` starts for itself
get what they need: its CRF helpers the malloc setting, a local cluster's worker processes both. A library
caller's process is left as it is unless the caller asks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_KEEP_FREE_TOP_BYTES = 2**31 - 1  # mallopt takes an int
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_FREE_TOP_BYTES))

ENVIRONMENT: dict[str, str] = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(_KEEP_FREE_TOP_BYTES),
}
"""The same settings as environment variables, which glibc reads when a process starts: for processes
started by others (a Dask nanny's workers)."""


def reuse_freed_memory() -> bool:
    """Set this process's malloc to reuse freed memory (see the module's docstring).

    Returns whether it took effect: only glibc has these settings (elsewhere nothing changes). Call it
    early, before threads start: a thread that has allocated keeps its own arena.
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        log.debug("not glibc: malloc left as it is")
        return False
    applied = all(mallopt(parameter, value) == 1 for parameter, value in _SETTINGS)
    if not applied:
        log.debug("glibc refused a malloc setting; freed memory may go back to the kernel")
    return applied


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it; musl and macOS have other mallocs
    except (OSError, AttributeError):
        return None
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


GC_THRESHOLDS = (10_000, 10, 10)
"""Python's collector thresholds for a long run (Python's default: 700, 10, 10): the first generation is
collected after 10,000 more allocations than frees, not 700."""


def collect_garbage_less_often() -> None:
    """Set Python's garbage collector to :data:`GC_THRESHOLDS` (see the module's docstring)."""
    gc.set_threshold(*GC_THRESHOLDS)
