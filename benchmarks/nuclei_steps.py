"""What `wsiuda segment` spends on a dense tile after the network and the CRF, step by step.

    nice .venv/bin/python benchmarks/nuclei_steps.py

Four 1456² windows of generated dense H&E (tests/synthetic.py, about 400 nuclei per 1024² core), the
default model's int8 probabilities refined by the default CRF, as the pipeline has them. Each step of a
tile's work after the CRF (pipelines/segment/tasks.py: _finish_block) is timed on one thread, with malloc
and the garbage collector set as `wsiuda segment` sets them (wsiuda.allocator), over the 4 tiles, and
keeps its fastest of --repeats rounds.
First, a tile's nuclei steps all together (block mean, label_nuclei, centroids, nucleus_polygons) on the
0.5 µm/px nuclei grid that `wsiuda segment` labels on now, and on the 0.25 µm/px working grid it labelled
on before; the rows after that time the steps one by one on the working grid.
Some steps are also timed the way they ran before, to show what each change saved: the exact distance
transform, the watershed over the whole tile at once, GEOS's valid-output snapping of every outline to the
0.01 px grid, the GeoJSON features with Python's default garbage collector thresholds, the store written
through zarr's own writes, and the core's entropy over every pixel.
Where the labelled data sets are at $WSIUDA_SHARED (default ../shared), the nuclei are also scored by AJI
against the labels of MoNuSeg 2018's official test images and TNBC's slides 10-11: labelled on the nuclei
grid, on the working grid, and on the working grid with the exact distance transform, each from the
default model's int8 probabilities with the default CRF and without it (as `wsiuda segment` has them;
the labels serve this report only).
Results go to benchmarks/results/nuclei_steps.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import hardware  # noqa: E402
from synthetic import synthetic_he  # noqa: E402

TNBC_TEST_SLIDES = ("slide-10", "slide-11")
WINDOW = 1456  # a 1024 tile with a 216 px halo (segment's halo is 213 px now, its window 1472 px)
CORE = 1024
GRID_FACTOR = 2  # the default nuclei grid, 0.5 µm/px, over the 0.25 µm/px working grid


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


def exact_markers(foreground: np.ndarray, *, split_depth_px: float) -> tuple[np.ndarray, np.ndarray]:
    """wsiuda.instances._markers as it was with OpenCV's exact distance transform (before)."""
    import cv2

    from wsiuda import instances

    padded = cv2.copyMakeBorder(foreground.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    # The exact distance rounds differently with OpenCV's thread count: the root of the whole number of
    # px² it stands for gave every thread count the same nuclei.
    distance = cv2.sqrt(np.rint(cv2.multiply(distance, distance)))
    levels = cv2.convertScaleAbs(distance, alpha=instances._LEVELS_PER_PX)
    depth = max(round(split_depth_px * instances._LEVELS_PER_PX), 1)
    domes = cv2.subtract(
        levels, instances._reconstruct(cv2.subtract(levels, np.full_like(levels, depth)), levels)
    )
    _, markers = cv2.connectedComponents((domes >= depth).astype(np.uint8), connectivity=8)
    return distance, markers


@contextlib.contextmanager
def exact_distance() -> Iterator[None]:
    """label_nuclei with the exact distance transform, as it was before."""
    from wsiuda import instances

    chamfer = instances._markers
    instances._markers = exact_markers
    try:
        yield
    finally:
        instances._markers = chamfer


# How the nuclei are labelled, scored side by side: on the nuclei grid (now), on the working grid (before),
# and on the working grid with the exact distance transform (before that).
GRIDS = {
    "0.5 µm/px grid (now)": (GRID_FACTOR, False),
    "working grid (before)": (1, False),
    "working grid, exact distance": (1, True),
}
REFINEMENTS = {"default CRF": "crf", "no CRF": "none"}


def labels_on_grid(probability: np.ndarray, factor: int, *, exact: bool = False) -> np.ndarray:
    """Nuclei of a probability on the working grid (0.25 µm/px), labelled on a grid ``factor`` times coarser
    with `wsiuda segment`'s default smallest nucleus and split depth, and drawn back on the working grid."""
    import cv2

    from wsiuda import instances

    mpp = 0.25 * factor
    height, width = probability.shape
    padded = cv2.copyMakeBorder(
        probability, 0, -height % factor, 0, -width % factor, cv2.BORDER_REPLICATE
    )  # to whole grid pixels
    settings = {"min_area_px": round(6.0 / mpp**2), "split_depth_px": 0.5 / mpp}
    with exact_distance() if exact else contextlib.nullcontext():
        labels = instances.label_nuclei(instances.block_mean(padded, factor), **settings)
    return labels.repeat(factor, axis=0).repeat(factor, axis=1)[:height, :width]


def split_quality(shared: Path) -> dict[str, Any] | None:
    """Mean AJI of the nuclei of each of :data:`GRIDS` on labelled test images, from the default model's
    int8 probabilities with the default CRF and without it; None without the data."""
    from wsiuda import metrics
    from wsiuda.crf import DEFAULT_CRF
    from wsiuda.data import read_mask, read_rgb
    from wsiuda.models import Segmenter, default_model_path
    from wsiuda.pipelines.evaluate import labelled_pairs, predict_probabilities

    datasets = shared / "datasets"
    if not (datasets / "monuseg2018").is_dir() or not (datasets / "tnbc").is_dir():
        return None
    pairs = {
        "MoNuSeg 2018 official test": labelled_pairs(datasets / "monuseg2018", split="test"),
        "TNBC slides 10-11": [p for p in labelled_pairs(datasets / "tnbc") if p.group in TNBC_TEST_SLIDES],
    }
    segmenter = Segmenter.load(default_model_path(), device="cpu", precision="auto")
    scores: dict[str, Any] = {"sets": {}}
    for name, chosen in pairs.items():
        rows: dict[tuple[str, str], list[float]] = {(r, grid): [] for r in REFINEMENTS for grid in GRIDS}
        nuclei = dict.fromkeys(rows, 0)
        for pair in chosen:
            truth = metrics.to_instances(read_mask(pair.mask))
            probabilities = predict_probabilities(
                segmenter, read_rgb(pair.image), data_mpp=0.25, variants={"crf": DEFAULT_CRF, "none": None}
            )
            for refined, grid in rows:
                factor, exact = GRIDS[grid]
                labels = labels_on_grid(probabilities[REFINEMENTS[refined]], factor, exact=exact)
                rows[refined, grid].append(metrics.aji(metrics.overlaps(labels, truth)))
                nuclei[refined, grid] += int(labels.max())
        scores["sets"][name] = {"images": len(chosen)} | {
            refined: {
                grid: {"aji": float(np.mean(rows[refined, grid])), "nuclei": nuclei[refined, grid]}
                for grid in GRIDS
            }
            for refined in REFINEMENTS
        }
    return scores


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
    parser.add_argument(
        "--shared", type=Path, default=Path(os.environ.get("WSIUDA_SHARED", REPO.parent / "shared"))
    )
    args = parser.parse_args()

    import cv2
    import shapely
    from skimage.segmentation import watershed

    from wsiuda import instances, polygons
    from wsiuda.allocator import collect_garbage_less_often, reuse_freed_memory
    from wsiuda.geometry import Region
    from wsiuda.io.geojson import FEATURE_NAMESPACE, dump_feature, feature_id, feature_lines, nucleus_feature
    from wsiuda.io.maskstore import TILE_STATS, MaskStore, to_uint8
    from wsiuda.overlay import draw_outlines
    from wsiuda.pipelines.segment import binary_entropy
    from wsiuda.pipelines.segment.tasks import _entropy_over_tissue

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

    def write_tiles_through_zarr() -> None:
        # MaskStore.write_tile as it was: each array written with zarr's own __setitem__.
        group: Any = store.group
        for index, (tile, lines) in enumerate(zip(labels, features, strict=True)):
            region = Region(index * CORE, 0, CORE, CORE).as_slices()
            store.probability[region] = to_uint8(probabilities[index][core.as_slices()])
            store.labels[region] = tile[core.as_slices()].astype(np.uint32)
            group["features"][index, 0] = "".join(dump_feature(f) + "\n" for f in lines)
            group["stats"][index, 0] = np.zeros(len(TILE_STATS))
            group["done"][index, 0] = 1

    rings = [np.asarray(s.polygon.exterior.coords) for tile in shapes for s in tile]
    # The entropy is taken of the network's probability under the core; the refined one stands in for it
    # (the same size and type). The core is all tissue, as most cores of a section are.
    tissue = np.ones((CORE, CORE), bool)
    entropy_inputs = [(probability, tissue) for probability in probabilities]

    def with_exact_distance(step: Callable[[], Any]) -> Any:
        with exact_distance():
            return step()

    def with_default_gc(step: Callable[[], Any]) -> Any:
        tuned = gc.get_threshold()
        gc.set_threshold(700, 10, 10)  # Python's defaults
        try:
            return step()
        finally:
            gc.set_threshold(*tuned)

    thumbnail = np.full((512, 512, 3), 255, np.uint8)

    def nuclei_steps(factor: int) -> None:
        # The steps of _finish_block from the refined probability to the outlines, as on a whole window.
        for probability in probabilities:
            coarse = instances.block_mean(probability, factor)
            tile = instances.label_nuclei(
                coarse, min_area_px=round(30 / factor**2), split_depth_px=2.0 / factor
            )
            ids, _ = instances.centroids(tile)
            polygons.nucleus_polygons(tile, ids, probability=coarse, scale=1.0 / factor, level0_mpp=0.25)

    steps: dict[str, Callable[[], Any]] = {
        "nuclei on the 0.5 µm/px grid: block mean, label_nuclei, centroids, nucleus_polygons (now)": lambda: (
            nuclei_steps(GRID_FACTOR)
        ),
        "  the same on the 0.25 µm/px working grid (before); the rows below are on it": lambda: nuclei_steps(
            1
        ),
        "label_nuclei (threshold, holes, split, small ones)": lambda: [
            instances.label_nuclei(p, min_area_px=30) for p in probabilities
        ],
        "  with the exact distance transform (before)": lambda: with_exact_distance(
            lambda: [instances.label_nuclei(p, min_area_px=30) for p in probabilities]
        ),
        "  of which the distance and the markers, 5x5 chamfer distance (now)": lambda: [
            instances._markers(f, split_depth_px=2.0) for f in foregrounds
        ],
        "  the same with the exact distance transform (before)": lambda: [
            exact_markers(f, split_depth_px=2.0) for f in foregrounds
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
        "GeoJSON text with ids: feature_lines (now)": lambda: [
            feature_lines(
                [s.polygon for s in tile],
                feature_ids=[feature_id("bench", *s.centroid) for s in tile],
                measurements=[s.measurements for s in tile],
            )
            for tile in shapes
        ],
        "  nucleus_feature, then dump_feature, ids from uuid.uuid5 (before)": lambda: [
            [
                dump_feature(
                    nucleus_feature(
                        s.polygon,
                        feature_uuid=str(
                            uuid.uuid5(FEATURE_NAMESPACE, "bench:{:.2f}:{:.2f}".format(*s.centroid))
                        ),
                        measurements=s.measurements,
                    )
                )
                for s in tile
            ]
            for tile in shapes
        ],
        "store write (probability, labels, features), chunk files (now)": write_tiles,
        "  through zarr's own writes (before)": write_tiles_through_zarr,
        "entropy of the core over its tissue, every second row and column (now)": lambda: [
            _entropy_over_tissue(p[core.as_slices()], core, None) for p, _ in entropy_inputs
        ],
        "  over every pixel (before)": lambda: [
            float(binary_entropy(p[core.as_slices()]).sum(dtype=np.float64, where=t))
            for p, t in entropy_inputs
        ],
        "overlay outlines (at the end of a run)": lambda: draw_outlines(thumbnail, rings, scale=0.1),
    }
    timed = fastest(args.repeats, steps)
    shutil.rmtree(workdir, ignore_errors=True)
    quality = split_quality(args.shared)
    nuclei = sum(len(tile) for tile in shapes) / len(shapes)
    per_tile = {name: ms / len(data) for name, ms in timed.items()}
    results = {
        "hardware": hardware(),
        "command": " ".join(["nice .venv/bin/python benchmarks/nuclei_steps.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "tiles": len(data),
        "nuclei_per_tile": nuclei,
        "ms_per_tile": per_tile,
        "split_quality": quality,
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
        *quality_lines(quality, args.shared),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nuclei_steps.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "nuclei_steps.md").write_text("\n".join(lines))
    print("\n".join(lines))


def quality_lines(quality: dict[str, Any] | None, shared: Path) -> list[str]:
    if quality is None:
        return [f"The nuclei were not scored: no labelled data sets under {shared}.", ""]
    lines = [
        "## The nuclei against the labels: nuclei grid, working grid, exact distance",
        "",
        "AJI (per image, averaged) against the labels, and the nuclei found, from the default model's int8 "
        "probabilities at 0.25 µm/px with the default CRF and without it. Threshold 0.5, smallest nucleus "
        "6 µm², split depth 0.5 µm, as `wsiuda segment` has them; on the 0.5 µm/px grid the probability is "
        "the mean of 2x2 working pixels and the labels are drawn back on the working grid to be scored.",
        "",
        f"| images | count | probability | {' | '.join(f'AJI, {grid}' for grid in GRIDS)} "
        f"| {' | '.join(f'nuclei, {grid}' for grid in GRIDS)} |",
        "|---|---:|---|" + "---:|" * (2 * len(GRIDS)),
    ]
    for name, row in quality["sets"].items():
        for refined in REFINEMENTS:
            scored = row[refined]
            lines.append(
                f"| {name} | {row['images']} | {refined} | "
                + " | ".join(f"{scored[grid]['aji']:.4f}" for grid in GRIDS)
                + " | "
                + " | ".join(str(scored[grid]["nuclei"]) for grid in GRIDS)
                + " |"
            )
    return [*lines, ""]


if __name__ == "__main__":
    main()
