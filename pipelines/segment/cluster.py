"""Where the tasks run: in this process, on a local Dask cluster sized to the machine, or on a given one."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from wsiuda.allocator import ENVIRONMENT as ALLOCATOR_ENVIRONMENT
from wsiuda.errors import ConfigError, WsiudaError
from wsiuda.pipelines.segment.config import SCHEDULER_SYNC, SegmentConfig

Task = tuple[Any, ...]
Runner = Callable[[Callable[..., Any], Iterable[tuple[Task, Any]]], Iterator[tuple[Any, Any]]]
"""Runs ``fn(*args)`` for each (args, tag) and yields (tag, result or WsiudaError) as tasks finish."""


@contextlib.contextmanager
def runner(config: SegmentConfig) -> Iterator[Runner]:
    """A :data:`Runner`: in this process (``sync``), or on a dask.distributed cluster."""
    if config.scheduler == SCHEDULER_SYNC:

        def run_here(fn: Callable[..., Any], tasks: Iterable[tuple[Task, Any]]) -> Iterator[tuple[Any, Any]]:
            for arguments, tag in tasks:
                yield tag, errors_returned(fn, *arguments)

        yield run_here
        return

    from dask.utils import funcname
    from distributed import as_completed

    with cluster_client(config) as client:

        def run_distributed(
            fn: Callable[..., Any], tasks: Iterable[tuple[Task, Any]]
        ) -> Iterator[tuple[Any, Any]]:
            tags: dict[Any, Any] = {}
            pending = as_completed()
            for arguments, tag in tasks:  # submitted as they come: workers start before the last is made
                # Named after fn, as Dask would name fn's own tasks.
                key = f"{funcname(fn)}-{uuid.uuid4().hex}"
                future = client.submit(errors_returned, fn, *arguments, key=key, pure=False)
                tags[future.key] = tag
                pending.add(future)
            for future in pending:
                result = future.result()
                tag = tags.pop(future.key)
                future.release()
                yield tag, result

        yield run_distributed


def errors_returned(fn: Callable[..., Any], *arguments: Any) -> Any:
    """``fn(*arguments)``, or the :class:`WsiudaError` it raised (bad input: a slide's unreadable tile).

    Such an error is the task's result, not its failure: a Dask worker logs a failed task with its
    traceback, where the user gets one line from the command instead.
    """
    try:
        return fn(*arguments)
    except WsiudaError as error:
        return error


# What one worker holds at its peak: torch, the model, the windows of its tasks in the network (see
# threads_per_worker), its slide reader's decoded tiles, and its CRF helpers, which also trace the nuclei.
# Workers keep their peak (wsiuda.allocator): a lone 2-task worker and its helpers peaked at 1437-1794 MiB
# from run to run with the CRF in int8, and at up to 1829 MiB (1.92e9 bytes) with --no-crf in float32
# (benchmarks/results/segment_throughput.md). The budget leaves about 17% above the largest of them, as
# peaks vary from run to run by a few hundred MiB.
WORKER_MEMORY_BYTES = 2.25e9


def local_workers(config: SegmentConfig) -> int:
    """Worker processes of the local cluster: --workers, else one per 2 cores as far as memory allows."""
    if config.workers:
        return config.workers
    import psutil

    cores = os.cpu_count() or 1
    by_memory = int(psutil.virtual_memory().available // WORKER_MEMORY_BYTES)
    return max(1, min(cores // 2, by_memory))


def threads_per_worker(config: SegmentConfig) -> int:
    """Tasks a worker runs at once (0: in this process, one at a time).

    A local worker runs one task per core it owns. In float32 only one of them is in the network at a
    time, on all those cores; in int8 each task's forward pass runs on one thread, side by side (see
    :func:`.model.forward_slots`). The other tasks read, run the CRF and trace nuclei on one thread each.
    With a GPU the CPU steps overlap the network; on a CPU they share the cores with it. pydensecrf holds the
    GIL while it runs, so such a worker runs its CRFs in a helper process (see crf_helper): in the
    worker, a CRF would stall the other task's forward pass. Giving the network only the cores that busy
    tasks leave free was no faster. A worker of an existing cluster keeps one task at a time, as its
    threads are that cluster's to set.
    """
    if config.scheduler == SCHEDULER_SYNC:
        return 0
    if config.scheduler:
        return 1
    return max(1, (os.cpu_count() or 1) // local_workers(config))


def tasks_run_here(config: SegmentConfig) -> bool:
    """Whether the tiles are processed in this process: a local cluster of one worker runs in it."""
    return config.scheduler == SCHEDULER_SYNC or (not config.scheduler and local_workers(config) == 1)


def crf_helpers_per_worker(config: SegmentConfig) -> int:
    """CRF helper processes per worker: one per task where a worker runs tasks side by side, else none."""
    tasks = threads_per_worker(config)
    return tasks if config.crf and tasks > 1 else 0


@contextlib.contextmanager
def cluster_client(config: SegmentConfig) -> Iterator[Any]:
    """A dask.distributed client: of the cluster at ``config.scheduler``, or of a new local cluster."""
    import dask
    from distributed import Client, LocalCluster

    if config.scheduler:
        try:
            client = Client(config.scheduler, timeout=dask.config.get("distributed.comm.timeouts.connect"))
        except (OSError, TimeoutError) as error:
            raise ConfigError(
                f"cannot reach the Dask scheduler at {config.scheduler} ({error}); check the address"
            ) from None
        except ValueError as error:  # not an address at all
            raise ConfigError(
                f"--scheduler {config.scheduler}: {error}; give a scheduler's address, e.g. tcp://host:8786"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    workers = local_workers(config)
    threads = threads_per_worker(config)
    # torch in each worker gets the worker's share of the cores (it reads these when it starts).
    environment = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    # Workers keep the memory they free for their next tiles (wsiuda.allocator), as the console script does.
    environment.update(ALLOCATOR_ENVIRONMENT)
    settings: dict[str, Any] = {
        f"distributed.nanny.pre-spawn-environ.{name}": value for name, value in environment.items()
    }
    settings["distributed.worker.daemon"] = False  # so that a worker may start its CRF helper process
    processes = workers > 1
    if processes:  # a lone worker runs in this process, which is the caller's to set up
        settings["distributed.worker.preload"] = ["wsiuda.pipelines.worker_setup"]
    # The statistical profiler samples every thread's stack each 10 ms, and the system monitor reads the
    # process's CPU, memory, network and disk counters each 500 ms, for a dashboard that this cluster does
    # not serve: the monitor alone cost the 100-tile generated slide about half a second in 31 (three runs
    # each way, timed by hand). The memory monitor, which pauses a worker short of memory, looks every
    # second instead of ten times a second. Each server's event-loop watchdog, which only logs a loop blocked
    # for 3 s, ticks each second instead of 50 times a second: those wake-ups were about half the event
    # loop's CPU (0.20 against 0.11 CPU-seconds in a 7 s run, timed by hand).
    settings["distributed.worker.profile.enabled"] = False
    settings["distributed.admin.tick.interval"] = "1s"
    settings["distributed.admin.system-monitor.interval"] = "60s"
    settings["distributed.admin.system-monitor.disk"] = False
    settings["distributed.worker.memory.monitor-interval"] = "1s"
    # The loggers a torn-down cluster writes to: Dask's, and Tornado's for its event loop's callbacks.
    cluster_logs = [logging.getLogger(name) for name in ("distributed", "tornado.application")]
    levels = [logger.level for logger in cluster_logs]
    # A nanny sets its workers' variables in this process to spawn them (see _environment_restored).
    with _environment_restored():
        with dask.config.set(settings):
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=threads,
                # A lone worker runs in this process: no process to spawn, and torch and the model are
                # loaded once. That saves seconds per run, a real share on a small slide.
                processes=processes,
                # The scheduler and the workers always serve HTTP (health checks, metrics). Left to
                # themselves, in-process ones listen on every interface, the scheduler on port 8787, where a
                # second run at the same time warned that the port was taken. Here: on loopback, on free
                # ports, and the scheduler without dashboard pages; nothing reaches them from elsewhere.
                dashboard_address="127.0.0.1:0",
                worker_dashboard_address="127.0.0.1:0",
                scheduler_kwargs={"dashboard": False},
                silence_logs=logging.ERROR,
            )
        try:
            with Client(cluster) as client:
                try:
                    yield client
                except KeyboardInterrupt:
                    # Torn down under a Ctrl-C, the scheduler can log errors about the futures dropped
                    # on the way ("Couldn't gather keys"), and the client's wait, interrupted before it
                    # had its future, a NameError from its cancel callback: noise to a user, who gets
                    # one line.
                    for logger in cluster_logs:
                        logger.setLevel(logging.CRITICAL)
                    raise
        finally:
            cluster.close()
            for logger, level in zip(cluster_logs, levels, strict=True):
                logger.setLevel(level)


@contextlib.contextmanager
def _environment_restored() -> Iterator[None]:
    """This process's environment as it was, whatever happens inside: a Dask nanny sets the workers'
    variables (``pre-spawn-environ``: OMP_NUM_THREADS, malloc's) in its own process to spawn a worker,
    and leaves them there, where they would reach every process the caller starts afterwards."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        if dict(os.environ) != saved:
            os.environ.clear()
            os.environ.update(saved)
