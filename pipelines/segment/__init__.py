"""``wsiuda segment``: slides → nuclei as GeoJSON for QuPath, a mask store, an overlay and a summary.

Per slide, the driver reads the metadata and the tissue mask, plans blocks (core tiles of the working grid
plus a halo derived from the network's receptive field, the CRF's reach and the largest nucleus) and
creates or reopens the slide's mask store. Batches of blocks then run as Dask tasks, each on one worker:

    read windows → batch → network S → dense CRF → label nuclei (watershed split) → keep the nuclei whose
    centroid lies in the core → polygons in level-0 px of the original slide → write the core's masks and
    the tile's features into the store and mark the tile done

Workers open the slide by path and keep one model per process (loaded once; nothing unpicklable travels in
the graph). When a slide's tiles are all done the driver streams the features, tile by tile in row-major
order, into the GeoJSON, draws the overlay and writes the summary; only then is the store marked
complete. A killed run resumes from the tiles marked done and writes the same GeoJSON byte for byte:
feature ids are uuid5 of the slide's name and the nucleus's position.

Modules, in the order a run meets them: :mod:`.config` (the command's options), :mod:`.sources` (inputs
and reading windows), :mod:`.cluster` (where tasks run), :mod:`.model` (the network, once per worker),
:mod:`.outputs` (output paths), :mod:`.slides` (a slide's plan and store), :mod:`.tasks` (a worker's
blocks), :mod:`.finalize` (GeoJSON, overlay and summary) and :mod:`.driver` (all of it, slide by slide).
"""

from wsiuda.pipelines.segment.config import SegmentConfig
from wsiuda.pipelines.segment.driver import SegmentReport, segment
from wsiuda.pipelines.segment.model import NetworkInfo, Predictor
from wsiuda.pipelines.segment.outputs import SlideResult
from wsiuda.pipelines.segment.sources import WindowReader, expand_inputs
from wsiuda.pipelines.segment.tasks import binary_entropy

__all__ = [
    "NetworkInfo",
    "Predictor",
    "SegmentConfig",
    "SegmentReport",
    "SlideResult",
    "WindowReader",
    "binary_entropy",
    "expand_inputs",
    "segment",
]
