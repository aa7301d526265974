"""Streaming GeoJSON FeatureCollection that QuPath (0.4-0.6) imports as detections.

Features are written one at a time, so memory does not grow with the number of nuclei. The file is
written under a temporary name and renamed when closed without error: a reader never sees a half-written
collection under the final name. A name ending in ``.gz`` is gzip-compressed (QuPath reads .geojson.gz).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import shapely
from shapely.geometry import Polygon

from wsiuda.config import atomic_output, write_error, writing

NUCLEUS_COLOR = (200, 0, 90)
"""The class colour QuPath shows for nuclei (RGB)."""

# uuid5 namespace of wsiuda feature ids: the same slide and position give the same id on every run.
FEATURE_NAMESPACE = uuid.UUID("6b1f3c1e-3a5f-5b59-9d7e-8a4b2c1d0e57")
_NAMESPACE_BYTES = FEATURE_NAMESPACE.bytes

GEOJSON_SUFFIXES = (".geojson", ".geojson.gz", ".json", ".json.gz")


def feature_id(slide_key: str, y: float, x: float) -> str:
    """A deterministic UUID for the object at level-0 (y, x) of a slide: ``uuid.uuid5`` of
    "key:y:x" in :data:`FEATURE_NAMESPACE`, written out from the SHA-1 digest directly (without the UUID
    object: half the time, 1.3 against 2.6 µs, timed by hand; it runs once per nucleus)."""
    digest = hashlib.sha1(_NAMESPACE_BYTES + f"{slide_key}:{y:.2f}:{x:.2f}".encode()).hexdigest()
    # RFC 4122: version 5 in the 13th hex digit, the variant's two top bits (10) in the 17th.
    variant = "89ab"[int(digest[16], 16) & 3]
    return f"{digest[:8]}-{digest[8:12]}-5{digest[13:16]}-{variant}{digest[17:20]}-{digest[20:32]}"


def polygon_coordinates(polygon: Polygon) -> list[list[list[float]]]:
    """GeoJSON rings of a polygon: closed lists of [x, y] to 0.01 px, exterior first."""
    rings = [polygon.exterior, *polygon.interiors]
    # Rounded as arrays: Python's round() on each of a nucleus's tens of vertices took twice as long
    # (timed by hand).
    return [np.round(shapely.get_coordinates(ring), 2).tolist() for ring in rings]


def nucleus_feature(
    polygon: Polygon,
    *,
    feature_uuid: str,
    measurements: Mapping[str, float],
    name: str = "Nucleus",
    color: Sequence[int] = NUCLEUS_COLOR,
) -> dict[str, Any]:
    """A GeoJSON Feature QuPath reads as one classified detection."""
    return {
        "type": "Feature",
        "id": feature_uuid,
        "geometry": {"type": "Polygon", "coordinates": polygon_coordinates(polygon)},
        "properties": {
            "objectType": "detection",
            "classification": {"name": name, "color": [int(c) for c in color]},
            "measurements": {key: float(value) for key, value in measurements.items()},
        },
    }


def feature_lines(
    polygons: Sequence[Polygon],
    *,
    feature_ids: Sequence[str],
    measurements: Sequence[Mapping[str, float]],
    name: str = "Nucleus",
    color: Sequence[int] = NUCLEUS_COLOR,
) -> list[str]:
    """:func:`dump_feature` of :func:`nucleus_feature` for each polygon: the same JSON values in the same
    layout, written with format strings instead of the json module, in a fraction of the time on a tile's
    nuclei (nuclei_steps.md).

    Coordinates are written with 10 significant digits: every value on the 0.01 px grid below 10^8 px
    reads back as the number ``json`` writes (a whole number without its ".0"). Measurements are written as
    ``json`` writes them, as floats.
    """
    shapes = np.asarray(polygons, dtype=object).reshape(-1)
    # All exteriors' coordinates in one GEOS call, cut into rings by their counts.
    exteriors = shapely.get_exterior_ring(shapes)
    ends = np.cumsum(shapely.get_num_coordinates(exteriors)).tolist()
    flat = shapely.get_coordinates(exteriors).ravel().tolist()
    holes = shapely.get_num_interior_rings(shapes).tolist()
    head = '{"type":"Feature","id":%s,"geometry":{"type":"Polygon","coordinates":[%s]},'
    classification = _json_text({"name": name, "color": [int(c) for c in color]}).replace("%", "%%")
    tail = (
        f'"properties":{{"objectType":"detection","classification":{classification},"measurements":{{%s}}}}}}'
    )
    keys: dict[str, str] = {}
    lines = []
    start = 0
    for index, end in enumerate(ends):
        rings = _ring_text(flat[2 * start : 2 * end])
        if holes[index]:
            rings += "".join(
                "," + _ring_text(shapely.get_coordinates(ring).ravel().tolist())
                for ring in shapes[index].interiors
            )
        values = ",".join(
            f"{keys.get(key) or keys.setdefault(key, _json_text(key))}:{float(value)!r}"
            for key, value in measurements[index].items()
        )
        feature_uuid = feature_ids[index]
        # A UUID needs no escaping: written as it is, else through json.
        quoted = f'"{feature_uuid}"' if feature_uuid.replace("-", "").isalnum() else _json_text(feature_uuid)
        lines.append(head % (quoted, rings) + tail % values)
        start = end
    return lines


def _ring_text(xy: list[float]) -> str:
    """[[x,y],...] of a ring's flat coordinates."""
    return "[" + ("[%.10g,%.10g]," * (len(xy) // 2))[:-1] % tuple(xy) + "]"


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def dump_feature(feature: Mapping[str, Any]) -> str:
    """One feature as compact JSON on one line (UTF-8: µ stays as it is, as QuPath writes it)."""
    return _json_text(feature)


class GeoJsonWriter:
    """Writes a FeatureCollection feature by feature; use as a context manager.

    ``write`` takes a feature dict, ``write_raw`` one already serialised with :func:`dump_feature`. On
    leaving the context without an exception the file appears atomically under ``path``; on an exception
    the temporary file is removed and ``path`` is left as it was.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.count = 0
        self._handle: io.TextIOWrapper | None = None
        self._output = contextlib.ExitStack()

    def __enter__(self) -> GeoJsonWriter:
        tmp = self._output.enter_context(atomic_output(self.path))
        try:
            with writing(self.path):
                raw = self._output.enter_context(open(tmp, "wb"))
                binary: io.BufferedWriter | gzip.GzipFile = raw
                if self.path.name.endswith(".gz"):
                    # mtime=0 and no name keep the bytes identical between runs with the same features.
                    # Level 1 writes nucleus GeoJSON about 4x faster than level 6 for ~25% more bytes
                    # (timed by hand).
                    binary = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="", compresslevel=1)
                self._handle = io.TextIOWrapper(binary, encoding="utf-8", newline="\n")
                self._handle.write('{"type":"FeatureCollection","features":[\n')
        except BaseException as error:
            # Python calls no __exit__ when __enter__ fails: the temporary file goes here.
            self._output.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def write(self, feature: Mapping[str, Any]) -> None:
        self.write_raw(dump_feature(feature))

    def write_lines(self, lines: Sequence[str]) -> None:
        """Features serialised with :func:`dump_feature`, in one write."""
        if not lines:
            return
        if self._handle is None:
            raise RuntimeError("GeoJsonWriter used outside its context")
        try:
            self._handle.write(("" if self.count == 0 else ",\n") + ",\n".join(lines))
        except OSError as error:  # not `with writing(...)`: this runs once per tile or nucleus
            raise write_error(self.path, error) from None
        self.count += len(lines)

    def write_raw(self, line: str) -> None:
        self.write_lines([line])

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._handle is not None
        handle, self._handle = self._handle, None
        try:
            with writing(self.path):
                if exc_type is None:
                    handle.write("\n]}\n")
                handle.close()  # flushes the gzip stream; the file underneath stays open for the stack
        except BaseException as error:
            self._output.__exit__(type(error), error, error.__traceback__)
            raise
        # Closes the file, then renames it into place, or removes it when the block raised.
        self._output.__exit__(exc_type, exc, tb)


def open_text(path: Path | str) -> IO[str]:
    """Open a GeoJSON file for reading, gzip or not."""
    path = Path(path)
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def load_features(path: Path | str) -> list[dict[str, Any]]:
    """All features of a FeatureCollection file (.geojson or .geojson.gz); for checks and small files."""
    with open_text(path) as handle:
        document = json.load(handle)
    if document.get("type") != "FeatureCollection":
        raise ValueError(f"{path} is not a GeoJSON FeatureCollection")
    features: list[dict[str, Any]] = document["features"]
    return features


def iter_feature_lines(path: Path | str) -> Iterator[str]:
    """The features of a file written by :class:`GeoJsonWriter`, one serialised feature at a time."""
    with open_text(path) as handle:
        for line in handle:
            line = line.rstrip("\n")
            if line.startswith("{") and not line.startswith('{"type":"FeatureCollection"'):
                yield line.rstrip(",")


_COORDINATES = '"coordinates":[['


def exterior_ring(line: str) -> np.ndarray:
    """The exterior ring ((n, 2) as x, y) of a Polygon feature serialised by :func:`dump_feature`."""
    points, _ = exterior_rings([line])
    return points


def exterior_rings(lines: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The exterior rings of Polygon features serialised by :func:`dump_feature` or :func:`feature_lines`:
    all their points ((n, 2) as x, y), ring after ring, and each ring's point count.

    Only the rings' own text is parsed, not the whole features, and all of it in one call: on the 41,568
    nuclei of benchmarks/segment_throughput.py's 100-tile slide that took 80 ms, against 109 ms ring by ring
    and 211 ms parsing each feature whole (timed by hand). A line in another layout is parsed whole.
    """
    texts = []
    for line in lines:
        start = line.find(_COORDINATES)
        end = line.find("]]", start)
        if start < 0 or end < 0:
            ring = json.loads(line)["geometry"]["coordinates"][0]
            texts.append(",".join(f"[{float(x)!r},{float(y)!r}]" for x, y in ring))
        else:
            texts.append(line[start + len(_COORDINATES) : end + 1])  # [x,y],[x,y],...
    counts = np.array([text.count("[") for text in texts], dtype=np.int64)
    numbers = ",".join(texts).replace("[", "").replace("]", "")  # x,y,x,y,...
    points = np.fromstring(numbers, sep=",") if numbers else np.zeros(0)
    return points.reshape(-1, 2), counts
