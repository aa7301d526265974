"""What every benchmark shares: the hardware description and a measured subprocess run."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_CONSOLE_SCRIPT = Path(sys.executable).parent / "wsiuda"
WSIUDA: list[str] = (
    [str(_CONSOLE_SCRIPT)]
    if _CONSOLE_SCRIPT.is_file()
    # Installed with --target (no console script beside the interpreter): the same entry point. -P keeps the
    # repository's wsiuda/ folder, in the working directory, from shadowing the installed package.
    else [sys.executable, "-P", "-c", "from wsiuda.cli.main import main; main()"]
)
"""The `wsiuda` command, as benchmarks run it."""


# The vector instructions that decide how fast int8 and float32 convolutions run, as /proc/cpuinfo names them.
VECTOR_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "amx_int8": "AMX-INT8"}


def cpu_model() -> str:
    """The CPU's model name and its vector instructions (a virtual machine's model name may say little)."""
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vector = [label for flag, label in VECTOR_FLAGS.items() if flag in flags]
    return f"{name} with {', '.join(vector)}" if vector else name


def hardware() -> dict[str, Any]:
    """The machine, with its load when the benchmark starts (figures from a loaded machine say so)."""
    import psutil

    cpus = os.cpu_count()
    load = os.getloadavg()
    return {
        "cpus": cpus,
        "cpu_model": cpu_model(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": "none",
        "python": platform.python_version(),
        "load_at_start": [round(value, 2) for value in load],
        "note": f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the start, "
        "benchmark run under `nice`",
    }


def run_measured(command: list[str]) -> dict[str, Any]:
    """Run a command: wall seconds, peak RSS summed over its process tree, CPU seconds of the tree.

    A thread samples the tree every :data:`SAMPLE_S` from /proc, and CPU time is the last sample of each
    process, so it shows what parallel workers cost in CPU whatever share of the shared machine they got.
    The sampler is kept light because it shares the cores with the command: psutil, which walks every
    process of the machine, took about 1 CPU-second of a 28 s `wsiuda segment` run on two cores, and so
    about 0.3 s of its wall time; reading the tree's own files takes about 0.25 (timed by hand).
    """
    samples: list[dict[int, tuple[int, float]]] = []
    stop = threading.Event()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample() -> None:
        while not stop.wait(SAMPLE_S):
            samples.append({pid: usage for pid in process_tree(process.pid) if (usage := _usage(pid))})

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{command} failed ({process.returncode}): {stderr}")
    cpu = {pid: seconds for sample in samples for pid, (_, seconds) in sample.items()}
    return {
        "wall_s": wall,
        "peak_rss_mb": max((sum(rss for rss, _ in s.values()) for s in samples), default=0) / 2**20,
        "cpu_s": sum(cpu.values()),
        "load_before": load_before,
        "stdout": stdout.strip(),
    }


SAMPLE_S = 0.05
"""How often :func:`run_measured` samples the process tree."""

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from each thread's children list in /proc (Linux)."""
    if not os.path.exists(f"/proc/{pid}/task/{pid}/children"):  # gone, or a kernel without those lists
        import psutil

        try:
            return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
        except psutil.Error:
            return [pid]
    tree, todo = [], [pid]
    while todo:
        member = todo.pop()
        tree.append(member)
        try:
            for task in os.listdir(f"/proc/{member}/task"):
                with open(f"/proc/{member}/task/{task}/children") as handle:
                    todo.extend(int(child) for child in handle.read().split())
        except OSError:  # gone in the meantime
            continue
    return tree


def _usage(pid: int) -> tuple[int, float] | None:
    """(RSS bytes, user + system CPU seconds) of a process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            rss = int(handle.read().split()[1]) * _PAGE
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # Fields 14 and 15 of stat (utime, stime), counted after the command name in parentheses.
    return rss, (int(fields[11]) + int(fields[12])) / _TICK


def write_generated_slide(path: Path, side: int, paint: Callable[[np.ndarray], None], *, levels: int) -> Path:
    """A side x side 40x Aperio-style SVS (JPEG tiles of 256) whose level 0 ``paint`` fills in place.

    Level 0 lives in a memmap beside ``path`` while it is painted and encoded, so memory stays small at
    any size; the slide appears under its name only when complete, and an existing one is reused.
    """
    from synthetic import write_pyramidal_tiff

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix(".level0.u8")
    level0 = np.lib.format.open_memmap(raw, mode="w+", dtype=np.uint8, shape=(side, side, 3))
    paint(level0)
    level0.flush()
    partial = path.with_suffix(".partial.svs")
    write_pyramidal_tiff(partial, level0, mpp=0.25, app_mag=40, tile=256, levels=levels)
    del level0
    raw.unlink()
    partial.rename(path)
    return path
