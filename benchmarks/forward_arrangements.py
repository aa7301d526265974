"""How to spend a CPU's cores on forward passes: one pass at a time on all threads, or one pass per core.

    nice .venv/bin/python benchmarks/forward_arrangements.py

`wsiuda segment` runs a worker's int8 forward passes side by side (one thread each) and its float32 passes
one at a time on all threads (pipelines/segment/model.py: forward_slots). This script measures the four
combinations on the default model, one process each (peak RSS of the process), over the same random
1472 px windows (segment's window: a 1024 px tile with its halo). The int8 rows are measured twice: with
the float layers run in bands of rows, as `wsiuda segment` runs them, and on whole tensors, as the
quantizer converts them (wsiuda/models/row_bands.py). Results go to
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

WINDOW = 1472
PASSES_PER_THREAD = 3

ONE_ARRANGEMENT = r"""
import json, sys, threading, time
import numpy as np, torch
from wsiuda.models import Segmenter
precision, side_by_side, cores, window, passes, bands = sys.argv[1], *map(int, sys.argv[2:7])
segmenter = Segmenter.load_default(device="cpu", precision=precision)
if precision == "int8" and not bands:  # rebuilt with its float layers on whole tensors
    from wsiuda.models.quantize import quantize
    from wsiuda.models.unet import fold_batchnorm
    segmenter._inference = quantize(
        fold_batchnorm(segmenter.network), segmenter.meta.activation_ranges, band_rows=None
    )
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
    for precision, bands in (("float32", True), ("int8", True), ("int8", False)):
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
                    str(int(bands)),
                ]
            )
            row = json.loads(measured["stdout"].splitlines()[-1])
            row.update(
                precision=precision,
                float_layers="in row bands" if bands else "whole tensors",
                side_by_side=side_by_side,
                peak_rss_mb=measured["peak_rss_mb"],
            )
            results["rows"].append(row)
            print(row, flush=True)
    hw = results["hardware"]
    lines = [
        "# Forward passes: one at a time on all threads, or side by side on one thread each",
        "",
        f"Machine: {hw['cpus']} CPU cores ({hw['cpu_model']}), {hw['memory_gb']} GB RAM, no GPU; "
        f"{hw['note']}. "
        f"Command: `{results['command']}`, {results['date']}. The default model, {WINDOW} px windows, "
        f"{PASSES_PER_THREAD} passes per thread after a warm-up, one process per row, "
        "with glibc's default malloc settings (`wsiuda segment` keeps freed memory for reuse instead: "
        "wsiuda/allocator.py).",
        "",
        "| precision | int8's float layers | arrangement | s per window | throughput vs one at a time | "
        "peak RSS MiB |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in results["rows"]:
        alone = next(
            r
            for r in results["rows"]
            if r["precision"] == row["precision"]
            and r["float_layers"] == row["float_layers"]
            and r["side_by_side"] == 1
        )
        arrangement = (
            f"one at a time, {cores} threads"
            if row["side_by_side"] == 1
            else f"{row['side_by_side']} side by side, 1 thread each"
        )
        lines.append(
            f"| {row['precision']} | {row['float_layers'] if row['precision'] == 'int8' else ''} | "
            f"{arrangement} | {row['seconds_per_window']:.2f} | "
            f"{alone['seconds_per_window'] / row['seconds_per_window']:.2f}x | {row['peak_rss_mb']:.0f} |"
        )
    out = REPO / "benchmarks" / "results"
    (out / "forward_arrangements.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "forward_arrangements.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
