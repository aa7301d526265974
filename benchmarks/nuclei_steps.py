"""What `wsiuda segment` spends on a dense tile after the network and the CRF, step by step.

    nice .venv/bin/python benchmarks/nuclei_steps.py

Four 1456² windows of generated dense H&E (tests/synthetic.py, about 400 nuclei per 1024² core), the
default model's int8 probabilities refined by the default CRF, as the pipeline has them. Each step of a
tile's work after the CRF (pipelines/segment/tasks.py: _finish_block) is timed on one thread, with malloc
and the garbage collector set as `wsiuda segment` sets them (wsiuda.allocator), over the 4 tiles, and
keeps its fastest of --repeats rounds.
Four of the steps are also timed the way they ran before, to show what each change saved: the watershed
over the whole tile at once, GEOS's valid-output snapping of every outline to the 0.01 px grid, the GeoJSON
features with Python's default garbage collector thresholds, and the core's entropy in float64 over a copy
of its tissue pixels.
Results go to benchmarks/results/nuclei_steps.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import hardware  # noqa: E402
from synthetic import synthetic_he  # noqa: E402

WINDOW = 1456  # a 1024 tile with its halo, as segment_throughput.md reports
CORE = 1024


def tiles(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, refined probability) of ``count`` dense windows, as the pipeline has them after the CRF."""
    import torch

    from wsiuda.crf import DEFAULT_CRF, dense_crf
    from wsiuda.models import Segmenter, default_model_path

    torch.set_num_threads(1)
    segmenter = Segmenter.load(default_model_path(), device="cpu", precision="auto")
    out = []
    for seed in range(count):
        image = synthetic_he((WINDOW, WINDOW), seed=100 + seed)
        out.append((image, dense_crf(image, segmenter.predict(image[None])[0], DEFAULT_CRF)))
    return out


def fastest(repeats: int, steps: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Milliseconds of each step (summed over the tiles), fastest of ``repeats`` rounds, round by round."""
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best.get(name, float("inf")), (time.perf_counter() - start) * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    import cv2
    import shapely
    from skimage.segmentation import watershed

    from wsiuda import instances, polygons
    from wsiuda.allocator import collect_garbage_less_often, reuse_freed_memory
    from wsiuda.geometry import Region
    from wsiuda.io.geojson import dump_feature, feature_id, nucleus_feature
    from wsiuda.io.maskstore import MaskStore
    from wsiuda.overlay import draw_outlines
    from wsiuda.pipelines.segment import binary_entropy

    cv2.setNumThreads(1)  # as each task of a segment worker runs
    reuse_freed_memory()  # as `wsiuda segment` sets its process's malloc
    collect_garbage_less_often()  # and its garbage collector
    data = tiles(args.tiles)
    margin = (WINDOW - CORE) // 2
    core = Region(margin, margin, CORE, CORE)
    probabilities = [probability for _, probability in data]
    labels = [instances.label_nuclei(p, min_area_px=30) for p in probabilities]
    found = [instances.centroids(tile) for tile in labels]

    def outlines_of() -> list[list[Any]]:
        return [
            polygons.nucleus_polygons(tile, ids, probability=p, level0_mpp=0.25)
            for tile, (ids, _), p in zip(labels, found, probabilities, strict=True)
        ]

    def features_of(shapes: list[list[Any]]) -> list[list[dict[str, Any]]]:
        return [
            [
                nucleus_feature(
                    s.polygon, feature_uuid=feature_id("bench", *s.centroid), measurements=s.measurements
                )
                for s in tile
            ]
            for tile in shapes
        ]

    shapes = outlines_of()
    features = features_of(shapes)
    # The watershed's and the snapping's inputs, as label_nuclei and nucleus_polygons make them.
    foregrounds = [instances.fill_holes(p > 0.5) for p in probabilities]
    floods = [(*instances._markers(f, split_depth_px=2.0), f) for f in foregrounds]
    # The outlines as nucleus_polygons has them before snapping: off the grid (moved by a fraction of it).
    outlines = [
        shapely.transform(np.array([s.polygon for s in tile], dtype=object), lambda xy: xy * 1.0001 + 0.0037)
        for tile in shapes
    ]
    workdir = Path(tempfile.mkdtemp())
    store = MaskStore.create(workdir / "m.zarr", shape=(4 * CORE, 4 * CORE), tile=CORE, mpp=0.25, metadata={})

    def write_tiles() -> None:
        for index, (tile, lines) in enumerate(zip(labels, features, strict=True)):
            store.write_tile(
                (index, 0),
                Region(index * CORE, 0, CORE, CORE),
                probability=probabilities[index][core.as_slices()],
                labels=tile[core.as_slices()].astype(np.uint32),
                features=[dump_feature(f) for f in lines],
                stats={},
            )

    rings = [np.asarray(s.polygon.exterior.coords) for tile in shapes for s in tile]
    # The entropy is taken of the network's probability under the core; the refined one stands in for it
    # (the same size and type), with a tissue mask that leaves out a tenth of the core.
    tissue = np.ones((CORE, CORE), bool)
    tissue[: CORE // 10] = False
    entropy_inputs = [(probability, tissue) for probability in probabilities]

    def with_default_gc(step: Callable[[], Any]) -> Any:
        tuned = gc.get_threshold()
        gc.set_threshold(700, 10, 10)  # Python's defaults
        try:
            return step()
        finally:
            gc.set_threshold(*tuned)

    def entropy_float64(probability: np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(probability, dtype=np.float64), 1e-7, 1 - 1e-7)
        return np.asarray(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))

    thumbnail = np.full((512, 512, 3), 255, np.uint8)
    steps: dict[str, Callable[[], Any]] = {
        "label_nuclei (threshold, holes, split, small ones)": lambda: [
            instances.label_nuclei(p, min_area_px=30) for p in probabilities
        ],
        "  of which the watershed, piece by piece (now)": lambda: [
            instances._flood(-distance, markers, foreground) for distance, markers, foreground in floods
        ],
        "  the watershed over the whole tile at once (before)": lambda: [
            watershed(-distance, markers, mask=foreground) for distance, markers, foreground in floods
        ],
        "centroids": lambda: [instances.centroids(tile) for tile in labels],
        "nucleus_polygons (outlines and measurements)": outlines_of,
        "  of which the snapping to the grid, vertex by vertex (now)": lambda: [
            polygons._on_grid(tile) for tile in outlines
        ],
        "  the snapping in GEOS's valid-output mode (before)": lambda: [
            shapely.set_precision(tile, polygons.GRID) for tile in outlines
        ],
        "GeoJSON features (nucleus_feature)": lambda: features_of(shapes),
        "  with Python's default garbage collector thresholds (before)": lambda: with_default_gc(
            lambda: features_of(shapes)
        ),
        "dump_feature": lambda: [[dump_feature(f) for f in tile] for tile in features],
        "store write (probability, labels, features)": write_tiles,
        "entropy of the core over its tissue (float32, now)": lambda: [
            float(binary_entropy(p[core.as_slices()]).sum(dtype=np.float64, where=t))
            for p, t in entropy_inputs
        ],
        "  in float64, over a copy of the tissue pixels (before)": lambda: [
            float(entropy_float64(p[core.as_slices()][t]).sum()) for p, t in entropy_inputs
        ],
        "overlay outlines (at the end of a run)": lambda: draw_outlines(thumbnail, rings, scale=0.1),
    }
    timed = fastest(args.repeats, steps)
    shutil.rmtree(workdir, ignore_errors=True)
    nuclei = sum(len(tile) for tile in shapes) / len(shapes)
    per_tile = {name: ms / len(data) for name, ms in timed.items()}
    results = {
        "hardware": hardware(),
        "command": " ".join(["nice .venv/bin/python benchmarks/nuclei_steps.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "tiles": len(data),
        "nuclei_per_tile": nuclei,
        "ms_per_tile": per_tile,
    }
    hw = results["hardware"]
    lines = [
        "# A dense tile's work after the network and the CRF",
        "",
        f"Machine: {hw['cpus']} CPU cores ({hw['cpu_model']}), {hw['memory_gb']} GB RAM; {hw['note']}. "
        f"Command: `{results['command'].strip()}`, {results['date']}. One thread; {len(data)} generated "
        f"{WINDOW}² windows, {nuclei:.0f} nuclei each on average; fastest of {args.repeats} rounds.",
        "",
        "| step | ms per tile |",
        "|---|---:|",
        *[f"| {name} | {ms:.1f} |" for name, ms in per_tile.items()],
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nuclei_steps.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "nuclei_steps.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
