"""Open any supported slide or image by path, with one-line errors that say what is wrong and the fix."""

from __future__ import annotations

import logging
from pathlib import Path

from wsiuda.errors import SlideError
from wsiuda.io.slide import SlideReader, is_plain_image, unreadable

log = logging.getLogger(__name__)

# "auto": TIFF-based slides through tiffslide (its tile-by-tile JPEG path costs about a third of
# libopenslide's CPU per tile, benchmarks/results/tile_throughput.md, with identical pixels), the rest through
# OpenSlide, which also reads DICOM, MRXS, VMS and the TIFFs tiffslide cannot open.
BACKENDS = ("auto", "openslide", "tiffslide")
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _is_tiff(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) in TIFF_MAGICS


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _check_tiff(path: Path) -> bool:
    """Whether a TIFF is a pyramidal/tiled slide (else a plain image); refuses truncated files up front.

    Backends open a truncated slide happily and fail only when a missing tile is read, maybe hours into
    a batch; comparing the tile offsets with the file size catches it in milliseconds.
    """
    import tifffile

    size = path.stat().st_size
    # tifffile logs (rather than raises) damage such as a page offset past the end of the file: collect
    # those records and turn them into one error instead of letting them print.
    tifffile_log = logging.getLogger("tifffile")
    damage = _Collect()
    tifffile_log.addHandler(damage)
    propagate, tifffile_log.propagate = tifffile_log.propagate, False
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            pages = [level.keyframe for level in series.levels]
            end = max(
                (
                    int(offset) + int(count)
                    for page in pages
                    for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True)
                ),
                default=0,
            )
            is_slide = bool(
                len(series.levels) > 1
                or pages[0].is_tiled
                or tif.is_svs
                or tif.is_ndpi
                or tif.is_scn
                or tif.is_bif
                or tif.is_philips
            )
    except Exception as error:  # tifffile raises TiffFileError, ValueError, struct.error ... on bad files
        raise SlideError(
            f"{path}: not a readable TIFF/slide ({error}); it may be truncated or corrupt: copy it again"
        ) from error
    finally:
        tifffile_log.removeHandler(damage)
        tifffile_log.propagate = propagate
    if end > size:
        raise SlideError(
            f"{path}: truncated ({size} bytes, but its image data run to byte {end}); copy the file again"
        )
    if damage.messages:
        raise SlideError(f"{path}: damaged TIFF ({damage.messages[0]}); it may be truncated: copy it again")
    return is_slide


def _try_tiffslide(path: Path) -> SlideReader | None:
    from wsiuda.io.backends import TiffSlideReader

    try:
        return TiffSlideReader(path)
    except SlideError as error:
        log.debug("%s; trying OpenSlide", error)
        return None


def open_slide(path: str | Path, *, backend: str = "auto", slide_mpp: float | None = None) -> SlideReader:
    """Open a slide or plain image by path.

    PNG/JPEG/BMP and non-pyramidal TIFFs are read as one-level images; everything else goes to ``backend``:
    "openslide", "tiffslide", or "auto" (tiffslide for TIFF-based slides it opens, OpenSlide otherwise).
    ``slide_mpp`` replaces (or supplies) the level-0 µm/px of the metadata.
    Raises :class:`~wsiuda.errors.SlideError` with the file name and the fix.
    """
    from wsiuda.io.plain import PlainImageReader

    path = Path(path)
    if backend not in BACKENDS:
        raise SlideError(f"{path}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if slide_mpp is not None and not slide_mpp > 0:
        raise SlideError(f"{path}: --slide-mpp must be positive, got {slide_mpp}")
    if not path.exists():
        raise SlideError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise SlideError(f"{path}: is a folder, not a slide; pass the slide files inside it")
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: empty file (0 bytes); copy the slide again")
    try:
        with path.open("rb"):
            pass
    except PermissionError:
        raise SlideError(unreadable(path)) from None

    reader: SlideReader
    if is_plain_image(path) or (_is_tiff(path) and not _check_tiff(path)):
        reader = PlainImageReader(path)
    elif backend == "auto" and _is_tiff(path) and (reader_or_none := _try_tiffslide(path)) is not None:
        reader = reader_or_none
    elif backend == "tiffslide":
        from wsiuda.io.backends import TiffSlideReader

        if not _is_tiff(path):
            raise SlideError(
                f"{path}: not a TIFF-based slide, the only kind tiffslide reads; "
                "try --backend openslide (it also reads DICOM, MRXS, VMS)"
            )

        reader = TiffSlideReader(path)
    else:
        from wsiuda.io.backends import OpenSlideReader

        try:
            reader = OpenSlideReader(path)
        except SlideError as error:
            if path.suffix.lower() == ".dcm":
                raise SlideError(
                    f"{path}: OpenSlide cannot open this DICOM file (it reads complete DICOM WSI series with "
                    "their pyramid); convert it to a pyramidal TIFF (e.g. with bfconvert or wsidicomizer)"
                ) from error
            raise SlideError(
                f"{error}; check that it is a whole-slide image and was copied whole"
                + ("" if _is_tiff(path) else ", or convert it to a pyramidal TIFF")
            ) from error
    reader.info = reader.info.with_mpp(slide_mpp)
    return reader
