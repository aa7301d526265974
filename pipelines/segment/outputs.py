"""Where each slide's outputs go, and how a slide fared."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from wsiuda.config import prepare_output_folder
from wsiuda.errors import ConfigError, OutputError
from wsiuda.io.geojson import GEOJSON_SUFFIXES
from wsiuda.pipelines.segment.config import SegmentConfig
from wsiuda.pipelines.segment.sources import SourceSpec


@dataclass(frozen=True)
class SlideOutputs:
    geojson: Path
    store: Path
    overlay: Path
    summary: Path


def output_prefix(path: Path) -> Path:
    """The output path without its GeoJSON suffix: the other outputs sit beside it with their own."""
    name = path.name
    for suffix in sorted(GEOJSON_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    return path


def plan_outputs(config: SegmentConfig, sources: Sequence[SourceSpec]) -> tuple[list[SlideOutputs], Path]:
    """Each source's output paths and the config's path; makes the output folder and checks it is writable.

    One file (``-o nuclei.geojson``): ``nuclei.mask.zarr``, ``nuclei.overlay.png``, ``nuclei.summary.json``
    and ``nuclei.segment.yaml`` beside it. A folder: ``<slide>.geojson`` (or ``.geojson.gz`` with gzip),
    ``<slide>.mask.zarr``, ``<slide>.overlay.png``, ``<slide>.summary.json`` per slide and one
    ``segment.yaml``.
    """
    out = Path(config.output)
    if config.single_file:
        if len(sources) != 1:
            raise ConfigError(
                f"-o {out} names one GeoJSON file but {len(sources)} slides were given; pass a folder as -o"
            )
        folder = out.parent
    else:
        folder = out
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out} exists and is not a folder; pass a folder or a .geojson path as -o")
    prepare_output_folder(folder)
    if config.single_file:
        prefix = output_prefix(out)
        return [_outputs(prefix, out)], prefix.with_name(prefix.name + ".segment.yaml")
    stems = [source.stem for source in sources]
    clash = sorted({stem for stem in stems if stems.count(stem) > 1})
    if clash:
        raise ConfigError(f"several inputs are named {', '.join(clash)}; segment them into separate folders")
    suffix = ".geojson.gz" if config.gzip else ".geojson"
    return [_outputs(out / stem, out / f"{stem}{suffix}") for stem in stems], out / "segment.yaml"


def _outputs(prefix: Path, geojson: Path) -> SlideOutputs:
    def beside(suffix: str) -> Path:
        return prefix.with_name(prefix.name + suffix)

    return SlideOutputs(
        geojson=geojson,
        store=beside(".mask.zarr"),
        overlay=beside(".overlay.png"),
        summary=beside(".summary.json"),
    )


@dataclass(frozen=True)
class SlideResult:
    """How one input fared."""

    source: str
    geojson: str | None = None
    nuclei: int = 0
    tiles: int = 0
    skipped: bool = False
    """Already complete from an earlier run (use --overwrite to redo)."""
    error: str | None = None
