"""What the worker processes that wsiuda starts set up as they start, and how their fork server ends.

A local `wsiuda segment` cluster names this module in ``distributed.worker.preload``: Dask imports it in
every worker process and calls :func:`dask_setup`. The workers' malloc settings travel in their environment
instead, since glibc reads them as a process starts (:mod:`wsiuda.allocator`).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from typing import Any

from wsiuda.allocator import collect_garbage_less_often


def dask_setup(worker: Any) -> None:
    """Called by Dask in a new worker process, before it runs a task."""
    collect_garbage_less_often()
    leave_interrupts_to_the_parent()


def serve_the_command(command_pid: int) -> None:
    """Set up a process of one of the command's own pools (CRF helpers, `wsiuda tile`'s workers): the
    command alone answers Ctrl-C and SIGTERM, and stops the pool; the process ends when the command does."""
    leave_interrupts_to_the_parent()
    # A batch scheduler sends SIGTERM to every process of the job: the command then stops as on Ctrl-C.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    end_with(command_pid)


def start_fork_server() -> None:
    """Start this process's multiprocessing fork server now (its preload set), deaf to SIGTERM.

    A batch scheduler's SIGTERM reaches every process of the job, and the command stops its pools itself
    (see serve_the_command). A fork server killed by it, though, breaks every pool forked from it at once:
    a pool learns of its processes' exits through the server. An ignored signal stays ignored across the
    exec that starts the server, so it is started with SIGTERM ignored for that moment. Only the main
    thread may set a signal's handler; from another the server starts as it is.
    """
    from multiprocessing import forkserver

    try:
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        forkserver.ensure_running()
        return
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGTERM, previous)


def end_with(command_pid: int) -> None:
    """End this pool process, and the fork server it came from, as soon as the command's process ends.

    A command that exits, or is interrupted, shuts its pools down itself. One that is killed (SIGKILL, the
    kernel's out-of-memory killer) cannot: its fork server and the pool's processes, forks of that server
    rather than of the command, went on running, hundreds of MB between them, until someone killed them.
    Their parent being the fork server, the kernel's parent-death signal does not reach them; so a thread
    waits for the command's process to end, then ends the fork server and this process. Where the command
    is already gone by the time the thread starts, the same happens at once.
    """
    parent = os.getppid()  # now, while it is the fork server (or the command): later it may be a reaper
    server = parent if parent != command_pid and _is_fork_server(parent) else None

    def wait_then_end() -> None:
        _wait_for_exit(command_pid)
        if server is not None and _is_fork_server(server):  # still it, not a process that took its number
            with contextlib.suppress(OSError):
                os.kill(server, signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=wait_then_end, name="end-with-command", daemon=True).start()


def _wait_for_exit(pid: int) -> None:
    """Block until process ``pid`` has ended: on a pidfd where the system has them (Linux 5.3+), else by
    checking every second."""
    try:
        handle = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfds here, or the process is already gone
        while _alive(pid):
            time.sleep(1.0)
        return
    try:
        select.select([handle], [], [])
    finally:
        os.close(handle)


def _is_fork_server(pid: int) -> bool:
    """Whether process ``pid`` is a multiprocessing fork server (by its command line, where /proc has it)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"multiprocessing.forkserver" in cmdline.read()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process has taken the number: ours is gone
        return False
    return True


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
