"""The streaming GeoJSON writer and the fields QuPath reads."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import uuid
from pathlib import Path

import pytest
import shapely
from conftest import needs_full_disk, open_on_full_disk
from shapely.geometry import Polygon, shape

from wsiuda.errors import OutputError
from wsiuda.io.geojson import (
    FEATURE_NAMESPACE,
    GeoJsonWriter,
    feature_id,
    feature_lines,
    iter_feature_lines,
    load_features,
    nucleus_feature,
)

SQUARE = Polygon([(10, 10), (20, 10), (20, 20), (10, 20)])


def feature(index: int) -> dict:  # type: ignore[type-arg]
    polygon = shapely.affinity.translate(SQUARE, xoff=index * 30)
    return nucleus_feature(
        polygon,
        feature_uuid=feature_id("slide.svs", 15.0, 15.0 + index * 30),
        measurements={"Area µm^2": 25.0, "Perimeter µm": 20.0, "Mean probability": 0.9, "Circularity": 0.785},
    )


def check_qupath_detection(item: dict) -> None:  # type: ignore[type-arg]
    """Every field QuPath 0.4-0.6 reads from a detection."""
    assert item["type"] == "Feature"
    assert str(uuid.UUID(item["id"])) == item["id"]
    assert item["geometry"]["type"] == "Polygon"
    ring = item["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) >= 4
    assert shape(item["geometry"]).is_valid
    properties = item["properties"]
    assert properties["objectType"] == "detection"
    classification = properties["classification"]
    assert classification["name"] == "Nucleus"
    assert len(classification["color"]) == 3 and all(isinstance(c, int) for c in classification["color"])
    measurements = properties["measurements"]
    assert isinstance(measurements, dict) and "Area µm^2" in measurements
    assert all(isinstance(value, float) for value in measurements.values())


@pytest.mark.parametrize("name", ["nuclei.geojson", "nuclei.geojson.gz"])
def test_written_collection_parses_back_with_every_field(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with GeoJsonWriter(path) as writer:
        for index in range(5):
            writer.write(feature(index))
    assert writer.count == 5
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as handle:
            assert handle.read(1) == b"{"
    features = load_features(path)
    assert len(features) == 5
    for item in features:
        check_qupath_detection(item)
    assert features[2]["geometry"]["coordinates"][0][0] == [70.0, 10.0]
    assert [json.loads(line)["id"] for line in iter_feature_lines(path)] == [f["id"] for f in features]


def test_empty_collection_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "none.geojson"
    with GeoJsonWriter(path):
        pass
    assert json.loads(path.read_text()) == {"type": "FeatureCollection", "features": []}


def test_micro_sign_is_written_as_utf8(tmp_path: Path) -> None:
    path = tmp_path / "n.geojson"
    with GeoJsonWriter(path) as writer:
        writer.write(feature(0))
    assert "Area µm^2".encode() in path.read_bytes()


def test_failure_leaves_no_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "n.geojson"
    path.write_text("old")
    with pytest.raises(RuntimeError), GeoJsonWriter(path) as writer:
        writer.write(feature(0))
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


def test_unwritable_folder_is_a_one_line_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="cannot write"), GeoJsonWriter(blocker / "n.geojson"):
        pass


@needs_full_disk
@pytest.mark.parametrize("features", [3, 20_000])  # flushed at the end, or while writing
def test_a_full_disk_is_a_one_line_output_error_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, features: int
) -> None:
    import wsiuda.io.geojson as geojson

    path = tmp_path / "n.geojson"
    monkeypatch.setattr(geojson, "open", open_on_full_disk, raising=False)  # the temporary file's open
    with (
        pytest.raises(OutputError, match=f"cannot write {path}: No space left on device"),
        GeoJsonWriter(path) as writer,
    ):
        for i in range(features):
            writer.write(feature(i))
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_file_that_cannot_be_opened_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import wsiuda.io.geojson as geojson

    def refuse(name: object, mode: str) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    path = tmp_path / "n.geojson"
    monkeypatch.setattr(geojson, "open", refuse, raising=False)
    writer = GeoJsonWriter(path)
    with pytest.raises(OutputError, match=f"cannot write {path}: Permission denied"):
        writer.__enter__()
    # Removed by the failed __enter__ itself, not later when the writer is garbage collected.
    assert list(tmp_path.iterdir()) == []
    del writer


def test_ids_are_uuids_deterministic_in_slide_and_position() -> None:
    assert feature_id("a.svs", 1.0, 2.0) == feature_id("a.svs", 1.0, 2.0)
    assert feature_id("a.svs", 1.0, 2.0) != feature_id("b.svs", 1.0, 2.0)
    assert feature_id("a.svs", 1.0, 2.0) != feature_id("a.svs", 1.0, 2.01)
    assert uuid.UUID(feature_id("a.svs", 1.0, 2.0)).version == 5


def test_gzip_output_is_byte_identical_between_runs(tmp_path: Path) -> None:
    for name in ("a.geojson.gz", "b.geojson.gz"):
        with GeoJsonWriter(tmp_path / name) as writer:
            for index in range(3):
                writer.write(feature(index))
    assert (tmp_path / "a.geojson.gz").read_bytes() == (tmp_path / "b.geojson.gz").read_bytes()


def test_memory_does_not_grow_with_the_number_of_features(tmp_path: Path) -> None:
    line = json.dumps(feature(0), ensure_ascii=False, separators=(",", ":"))

    def peak(count: int) -> int:
        tracemalloc.start()
        with GeoJsonWriter(tmp_path / f"{count}.geojson.gz") as writer:
            for _ in range(count):
                writer.write_raw(line)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(1_000), peak(20_000)
    assert large < small + 256 * 1024, (small, large)


def test_lines_written_together_read_back_as_lines_written_one_by_one(tmp_path: Path) -> None:
    lines = [json.dumps(feature(index), ensure_ascii=False, separators=(",", ":")) for index in range(5)]
    with GeoJsonWriter(tmp_path / "a.geojson") as writer:
        writer.write_raw(lines[0])
        writer.write_lines(lines[1:3])
        writer.write_lines([])
        writer.write_lines(lines[3:])
    assert writer.count == 5
    with GeoJsonWriter(tmp_path / "b.geojson") as writer:
        for line in lines:
            writer.write_raw(line)
    assert (tmp_path / "a.geojson").read_bytes() == (tmp_path / "b.geojson").read_bytes()


def test_feature_ids_are_uuid5_of_the_slide_and_position() -> None:
    for key, y, x in [("slide.svs", 15.0, 45.0), ("µ slide.tif", 123456.785, 0.004), ("a", 0.0, 99999.99)]:
        assert feature_id(key, y, x) == str(uuid.uuid5(FEATURE_NAMESPACE, f"{key}:{y:.2f}:{x:.2f}"))


def test_feature_lines_parse_back_to_the_features_the_json_module_writes() -> None:
    from wsiuda.io.geojson import dump_feature

    polygons = [
        SQUARE,
        Polygon(
            [(0.25, 1.5), (40, 0.75), (40.01, 30), (0, 30)], holes=[[(10, 10), (20, 10), (20, 20), (10, 20)]]
        ),
        Polygon([(123456.78, 98765.43), (123470.01, 98765.43), (123470.01, 98790.5), (123456.78, 98790.5)]),
    ]
    ids = [feature_id("slide.svs", index, index) for index in range(len(polygons))]
    measurements = [
        {"Area µm^2": 25.0, "Perimeter µm": 20.1234, "Mean probability": 0.9, "Circularity": 1.0},
        {"Area µm^2": 1e-4, "Solidity": 0.5},
        {},
    ]
    lines = feature_lines(polygons, feature_ids=ids, measurements=measurements)
    for line, polygon, feature_uuid, values in zip(lines, polygons, ids, measurements, strict=True):
        expected = nucleus_feature(polygon, feature_uuid=feature_uuid, measurements=values)
        assert json.loads(line) == expected
        assert json.loads(line)["properties"] == json.loads(dump_feature(expected))["properties"]
        assert "\n" not in line  # one feature, one line, as the store and the writer keep them
    check_qupath_detection(json.loads(lines[0]))
    (odd,) = feature_lines([SQUARE], feature_ids=['a "quoted" id'], measurements=[{}])
    assert json.loads(odd)["id"] == 'a "quoted" id'
    (named,) = feature_lines([SQUARE], feature_ids=["b"], measurements=[{}], name='50% "odd"')
    assert json.loads(named)["properties"]["classification"]["name"] == '50% "odd"'
    assert feature_lines([], feature_ids=[], measurements=[]) == []


def test_the_exterior_ring_of_a_serialised_feature_is_its_first_ring() -> None:
    import numpy as np

    from wsiuda.io.geojson import dump_feature, exterior_ring, exterior_rings

    with_hole = Polygon(
        [(0.25, 1.5), (40, 0.75), (40.01, 30), (0, 30)], holes=[[(10, 10), (20, 10), (20, 20), (10, 20)]]
    )
    for polygon in (SQUARE, with_hole):
        line = dump_feature(nucleus_feature(polygon, feature_uuid="a", measurements={"Area µm^2": 1.0}))
        expected = np.asarray(json.loads(line)["geometry"]["coordinates"][0])
        np.testing.assert_array_equal(exterior_ring(line), expected)
        (written,) = feature_lines([polygon], feature_ids=["a"], measurements=[{"Area µm^2": 1.0}])
        np.testing.assert_array_equal(exterior_ring(written), expected)
    # Another key order: parsed whole.
    line = json.dumps({"geometry": {"coordinates": [[[1, 2], [3, 4], [5, 7], [1, 2]]], "type": "Polygon"}})
    np.testing.assert_array_equal(exterior_ring(line), [[1, 2], [3, 4], [5, 7], [1, 2]])
    # Many lines at once: every ring's points one after another, and each ring's count.
    lines = [dump_feature(nucleus_feature(p, feature_uuid="a", measurements={})) for p in (SQUARE, with_hole)]
    points, counts = exterior_rings([lines[0], line, lines[1]])
    expected = [exterior_ring(lines[0]), exterior_ring(line), exterior_ring(lines[1])]
    np.testing.assert_array_equal(counts, [len(ring) for ring in expected])
    np.testing.assert_array_equal(points, np.concatenate(expected))
    empty_points, empty_counts = exterior_rings([])
    assert empty_points.shape == (0, 2) and len(empty_counts) == 0
