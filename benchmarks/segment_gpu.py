"""`wsiuda segment` on a GPU: end to end against the forward passes alone, and against the same machine's CPU.

    python benchmarks/segment_gpu.py --out DIR [--repeats 2]

Needs a CUDA build of torch and a GPU. All figures come from one run on one machine:
1. Slides: a generated 20480² 40x slide with one 10240² section of tissue (100 tiles, as in
   segment_throughput.py) and, where ../shared is present (WSIUDA_SHARED), CMU-1-Small-Region.svs.
2. End to end: `wsiuda segment` with its defaults (`--device auto` takes the GPU; float32 with float16
   autocast, batches of 4, the CRF on the CPU), with `--no-crf`, and with `--device cpu` (the same
   machine's CPU cores), each timed from process start to exit.
3. GPU model only: the forward passes alone over the same windows, in batches of 4 in one process,
   probabilities copied back to the host as the pipeline needs them.
The default and model-only runs repeat --repeats times, round by round; each keeps its fastest.
Results go to DIR/segment_gpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import cpu_model  # noqa: E402
from segment_throughput import (  # noqa: E402
    CMU1,
    benchmark_model,
    end_to_end,
    fastest_of,
    make_section_slide,
    plan,
)

BATCH = 4  # segment's default batch on a GPU


def gpu_model_only(job: Any, blocks: list[Any], model: Path) -> dict[str, Any]:
    """Forward passes alone on the GPU over the blocks' windows (read first), BATCH at a time."""
    import torch

    from wsiuda.models import Segmenter
    from wsiuda.pipelines.segment import WindowReader

    segmenter = Segmenter.load(model, device="cuda", precision="auto")
    reader = WindowReader(job.source, job.scale)
    images = [reader.read(block.window) for block in blocks]
    reader.close()
    segmenter.predict(np.stack(images[:BATCH]), batch_size=BATCH)  # warm-up: cuDNN picks its kernels
    torch.cuda.synchronize()
    start = time.perf_counter()
    for first in range(0, len(images), BATCH):
        segmenter.predict(np.stack(images[first : first + BATCH]), batch_size=BATCH)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"tiles": len(images), "wall_s": seconds, "tiles_per_s": len(images) / seconds}


def report(results: dict[str, Any]) -> str:
    hw = results["hardware"]
    lines = [
        "# `wsiuda segment` on a GPU",
        "",
        f"Machine: {hw['gpu']}, {hw['cpus']} CPU cores ({hw['cpu_model']}); torch {hw['torch']}, "
        f"Python {hw['python']}. Command: `{results['command']}`, {results['date']}. Model: "
        f"{results['model']}. Wall time is process start to exit. Default and model-only runs: fastest "
        f"of {results['repeats']}, round by round (all times in the JSON).",
        "",
        "| slide | run | tiles | nuclei | wall s | tiles/s | workers x tasks | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, slide in results["slides"].items():
        for label, key in (
            ("`wsiuda segment` (GPU, CRF on the CPU)", "gpu"),
            ("`wsiuda segment --no-crf` (GPU)", "gpu_no_crf"),
            ("`wsiuda segment --device cpu`", "cpu"),
        ):
            run = slide[key]
            lines.append(
                f"| {name} | {label} | {run['tiles']} | {run['nuclei']} | {run['wall_s']:.1f} | "
                f"{run['tiles_per_s']:.2f} | {run['workers']} x {run['threads_per_worker']} | "
                f"{run['peak_rss_mb']:.0f} |"
            )
        model = slide["model_only"]
        lines.append(
            f"| {name} | GPU forward passes alone, batches of {BATCH} | {model['tiles']} |  | "
            f"{model['wall_s']:.1f} | {model['tiles_per_s']:.2f} |  |  |"
        )
    lines += ["", "## Shares", ""]
    for name, slide in results["slides"].items():
        gpu, model = slide["gpu"], slide["model_only"]
        lines.append(
            f"- {name}: the forward passes alone take {model['wall_s'] / gpu['wall_s']:.0%} of the GPU "
            f"run's wall time ({gpu['wall_s'] - slide['gpu_no_crf']['wall_s']:+.1f} s with the CRF against "
            f"`--no-crf`); the GPU run is {slide['cpu']['wall_s'] / gpu['wall_s']:.2f}x as fast as the "
            "same machine's CPU. Stage seconds summed over tasks (GPU run): "
            + ", ".join(f"{k} {v:.1f}" for k, v in gpu["stage_s"].items())
            + "."
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "wsiuda-gpu-bench"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a 4096² slide with 4 tiles of tissue only")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("segment_gpu.py: torch sees no GPU; run it on a machine with one and a CUDA build of torch")
    # The repository's own wsiuda/ must not shadow the installed package in the runs' processes.
    os.environ["PYTHONSAFEPATH"] = "1"
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "hardware": {
            "gpu": torch.cuda.get_device_name(0),
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "command": " ".join(["python benchmarks/segment_gpu.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "repeats": args.repeats,
        "slides": {},
    }
    model, results["model"] = benchmark_model(args.workdir)
    side = 4096 if args.quick else 20480
    slides = {
        f"generated {side}², one {side // 2}² section": make_section_slide(
            args.workdir / f"section-{side}.svs", side, section=side // 2
        )
    }
    if CMU1.exists() and not args.quick:
        slides["CMU-1-Small-Region.svs"] = CMU1
    print(f"slides ready after {time.perf_counter() - started:.0f} s", flush=True)
    for name, path in slides.items():
        print(f"== {name}", flush=True)
        job, blocks, _ = plan(path, model, tile=1024)
        print(f"{len(blocks)} tiles planned after {time.perf_counter() - started:.0f} s", flush=True)
        entry: dict[str, Any] = fastest_of(
            args.repeats,
            {
                "gpu": partial(end_to_end, path, model, args.workdir / "gpu"),
                "model_only": partial(gpu_model_only, job, blocks, model),
            },
        )
        entry["gpu_no_crf"] = end_to_end(path, model, args.workdir / "gpu-nocrf", "--no-crf")
        entry["cpu"] = end_to_end(path, model, args.workdir / "cpu", "--device", "cpu")
        results["slides"][name] = entry
        print(json.dumps(entry, indent=1, default=str), flush=True)
        # After each slide, so that a run cut short keeps what it measured.
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "segment_gpu.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (args.out / "segment_gpu.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
