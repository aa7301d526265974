"""How to spend a CPU's cores on forward passes: one pass at a time on all threads, or one pass per core.

    nice .venv/bin/python benchmarks/forward_arrangements.py

`wsiuda segment` runs a worker's int8 forward passes side by side (one thread each) and its float32 passes
one at a time on all threads (pipelines/segment/model.py: forward_slots). This script measures the four
combinations on the default model, one process each (peak RSS of the process), over the same random
1456 px windows (a 1024 px tile with a 216 px halo; segment's window is 1472 px now). Results go to
benchmarks/results/forward_arrangements.{json,md}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import hardware, run_measured  # noqa: E402

WINDOW = 1456
PASSES_PER_THREAD = 3

ONE_ARRANGEMENT = r"""
import json, sys, threading, time
import numpy as np, torch
from wsiuda.models import Segmenter
precision, side_by_side, cores, window, passes = sys.argv[1], *map(int, sys.argv[2:6])
segmenter = Segmenter.load_default(device="cpu", precision=precision)
torch.set_num_threads(1 if side_by_side > 1 else cores)
image = np.random.default_rng(0).integers(0, 256, (1, window, window, 3), dtype=np.uint8)
segmenter.predict(image)  # warm-up
def work():
    for _ in range(passes):
        segmenter.predict(image)
threads = [threading.Thread(target=work) for _ in range(side_by_side)]
start = time.perf_counter()
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"seconds_per_window": (time.perf_counter() - start) / (passes * side_by_side)}))
"""


def main() -> None:
    cores = os.cpu_count() or 1
    results: dict[str, Any] = {
        "hardware": hardware(),
        "command": "nice .venv/bin/python benchmarks/forward_arrangements.py",
        "date": time.strftime("%Y-%m-%d"),
        "window_px": WINDOW,
        "rows": [],
    }
    for precision in ("float32", "int8"):
        for side_by_side in (1, cores):
            measured = run_measured(
                [
                    sys.executable,
                    "-c",
                    ONE_ARRANGEMENT,
                    precision,
                    str(side_by_side),
                    str(cores),
                    str(WINDOW),
                    str(PASSES_PER_THREAD),
                ]
            )
            row = json.loads(measured["stdout"].splitlines()[-1])
            row.update(precision=precision, side_by_side=side_by_side, peak_rss_mb=measured["peak_rss_mb"])
            results["rows"].append(row)
            print(row, flush=True)
    hw = results["hardware"]
    lines = [
        "# Forward passes: one at a time on all threads, or side by side on one thread each",
        "",
        f"Machine: {hw['cpus']} CPU cores ({hw['cpu_model']}), {hw['memory_gb']} GB RAM, no GPU; "
        f"{hw['note']}. "
        f"Command: `{results['command']}`, {results['date']}. The default model, {WINDOW} px windows, "
        f"{PASSES_PER_THREAD} passes per thread after a warm-up, one process per row.",
        "",
        "| precision | arrangement | s per window | throughput vs one at a time | peak RSS MB |",
        "|---|---|---:|---:|---:|",
    ]
    for row in results["rows"]:
        alone = next(
            r for r in results["rows"] if r["precision"] == row["precision"] and r["side_by_side"] == 1
        )
        arrangement = (
            f"one at a time, {cores} threads"
            if row["side_by_side"] == 1
            else f"{row['side_by_side']} side by side, 1 thread each"
        )
        lines.append(
            f"| {row['precision']} | {arrangement} | {row['seconds_per_window']:.2f} | "
            f"{alone['seconds_per_window'] / row['seconds_per_window']:.2f}x | {row['peak_rss_mb']:.0f} |"
        )
    out = REPO / "benchmarks" / "results"
    (out / "forward_arrangements.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "forward_arrangements.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
