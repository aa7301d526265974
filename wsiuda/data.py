"""Patch datasets: labelled source folders, unlabelled target sources, and random patch sampling (numpy only).

Labelled folders come in two layouts: ``images/`` + ``masks/`` (masks matched by file stem; binary 0/255 or
instance labels, which become binary), or TNBC's own ``Slide_XX/`` + ``GT_XX/``. An optional ``split.tsv``
(``name<TAB>split``) says which split each image belongs to: rows whose split names a held-out set
(``test`` by default) are never read for training, and rows marked ``val`` form the source validation set.
Each image has a *group* (the slide or patient it comes from) so that validation splits never put crops of one
slide on both sides.

Small datasets are decoded once and kept in memory at the working resolution. Target slides are tiled on the
fly: tissue tiles are listed once, then random tiles are read as training asks for them.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import cv2
import numpy as np

from wsiuda.errors import DataError, OutputError, SlideError
from wsiuda.geometry import Region, scale_factor
from wsiuda.io.slide import SlideReader

if TYPE_CHECKING:
    from wsiuda.io.store import TileStore

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SLIDE_SUFFIXES = (
    ".svs",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".bif",
    ".vms",
    ".vmu",
    ".svslide",
    ".dcm",
    ".tif",
    ".tiff",
)
TNBC_NAME = re.compile(r"^(\d+)_\d+$")
TCGA_NAME = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.IGNORECASE)
MIN_TISSUE = 0.5


# ------------------------------------------------------------------------------------------------ naming
def group_id(stem: str) -> str:
    """The slide or patient an image comes from: TNBC ``XX_N`` is slide XX, TCGA barcodes give the patient."""
    match = TNBC_NAME.match(stem)
    if match:
        return f"slide-{match.group(1)}"
    match = TCGA_NAME.match(stem)
    if match:
        return match.group(1).upper()
    return stem


def dataset_name(root: Path) -> str:
    root = Path(root).resolve()
    return root.parent.name if root.name in ("images", "img") else root.name


LICENSE_NAME = re.compile(
    r"CC0[ -]1\.0|CC[ -]BY(?:-(?:NC|SA|ND))*(?: \d\.\d)?|MIT|Apache[ -]2\.0|BSD-\d-Clause"
)


def dataset_license(root: Path) -> str:
    """The first license named in a PROVENANCE.md, LICENSE or README beside the data, else "unknown"."""
    root = Path(root).resolve()
    for folder in (root, root.parent):
        for name in ("PROVENANCE.md", "LICENSE", "LICENSE.txt", "README.md"):
            path = folder / name
            if not path.is_file():
                continue
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            for line in (line for line in lines if "license" in line.lower()):
                match = LICENSE_NAME.search(line)
                if match:
                    return match.group(0)
    return "unknown"


def read_split_table(root: Path) -> dict[str, str]:
    """``split.tsv`` of a dataset folder (name, split per line), or {} where there is none."""
    path = Path(root) / "split.tsv"
    if not path.is_file():
        return {}
    table = {}
    for number, line in enumerate(_text_of(path, "lines of 'name<TAB>split'").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise DataError(f"{path}:{number}: expected 'name<TAB>split', got {line!r}")
        table[Path(parts[0].strip()).stem] = parts[1].strip()
    return table


def _text_of(path: Path, expected: str) -> str:
    """A small text file of a dataset folder; one that is not UTF-8 text is a DataError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text file; it should hold {expected}") from None


def is_held_out(split: str | None, held_out: Sequence[str]) -> bool:
    return split is not None and any(word.lower() in split.lower() for word in held_out)


def is_validation(split: str | None) -> bool:
    return split is not None and "val" in split.lower()


def image_files(folder: Path) -> list[Path]:
    """Image files of a folder, sorted; other files (notes, .DS_Store) are skipped."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [p for p in files if not p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------- reading
def read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB (alpha dropped), or a DataError naming the file."""
    from wsiuda.io import open_slide

    try:
        with open_slide(path) as reader:
            height, width = reader.info.shape
            return reader.read_level(Region(0, 0, height, width), level=0)
    except SlideError as error:
        raise DataError(str(error)) from None


def read_mask(path: Path) -> np.ndarray:
    """A mask file as bool (H, W): any non-zero value (0/255 binary or instance ids) is foreground."""
    return np.asarray(read_label_map(path) != 0)


def read_label_map(path: Path) -> np.ndarray:
    """A mask file as it is stored, (H, W): 0/255 binary, or instance ids (e.g. 16-bit) kept for scoring."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            pixels = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image)
    except Exception as error:  # PIL and tifffile raise many types for broken files
        raise DataError(
            f"{path}: cannot read this mask ({error}); it may be truncated or not an image"
        ) from None
    if pixels.ndim == 3:
        pixels = pixels[..., :3].max(axis=-1) if pixels.shape[-1] in (3, 4) else pixels[..., 0]
    if pixels.ndim != 2:
        raise DataError(f"{path}: a mask must be a single-channel image, got shape {pixels.shape}")
    return np.asarray(pixels)


MPP_FILE = "mpp.txt"
"""An optional file in a labelled folder holding one number: the µm/px of its images."""
DEFAULT_IMAGE_MPP = 0.25
"""µm/px of a folder's images where neither the command nor the folder's mpp.txt says (40x)."""


def images_mpp(root: Path, given: float | None) -> float:
    """µm/px of the images under ``root``: ``given`` (an option), else the folder's mpp.txt, else 0.25."""
    if given is not None:
        return given
    written = folder_mpp(root) if Path(root).is_dir() else None
    return DEFAULT_IMAGE_MPP if written is None else written


def folder_mpp(root: Path) -> float | None:
    """The µm/px written in ``root/mpp.txt``, or None where the folder has no such file."""
    path = Path(root) / MPP_FILE
    if not path.is_file():
        return None
    text = _text_of(path, "one positive number (µm per pixel, e.g. 0.25)").split("#", 1)[0].strip()
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise DataError(f"{path}: expected one positive number (µm per pixel, e.g. 0.25), got {text!r}")
    return value


def resample_pair(
    image: np.ndarray, mask: np.ndarray | None, factor: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize by ``factor`` (> 1 enlarges): linear (up) or area (down) for the image, nearest for the mask."""
    if abs(factor - 1.0) < 1e-6:
        return image, mask
    height, width = image.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    interpolation = cv2.INTER_LINEAR if factor > 1 else cv2.INTER_AREA
    image = cv2.resize(image, size, interpolation=interpolation)
    if mask is not None:
        mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    return image, mask


# ------------------------------------------------------------------------------------------- labelled sets
@dataclass(frozen=True, eq=False)
class LabelledImage:
    name: str
    group: str
    split: str | None
    image: np.ndarray
    """uint8 (H, W, 3) at the working resolution."""
    mask: np.ndarray
    """bool (H, W) at the working resolution."""


@dataclass(frozen=True, eq=False)
class LabelledSet:
    name: str
    root: Path
    license: str
    images: tuple[LabelledImage, ...]

    @property
    def groups(self) -> list[str]:
        return sorted({item.group for item in self.images})

    def subset(self, keep: Sequence[LabelledImage]) -> LabelledSet:
        return LabelledSet(self.name, self.root, self.license, tuple(keep))


def find_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths of a labelled folder in either layout; a missing mask is an error naming it."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{root}: no such folder; pass a folder with images/ and masks/ (or TNBC's Slide_XX/ GT_XX/)"
        )
    if (root / "images").is_dir() and (root / "masks").is_dir():
        folders = [(root / "images", root / "masks")]
    else:
        slides = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("Slide_"))
        folders = [(slide, root / slide.name.replace("Slide_", "GT_", 1)) for slide in slides]
        if not folders:
            raise DataError(
                f"{root}: found neither images/ + masks/ nor Slide_XX/ + GT_XX/ folders; put the images in "
                f"{root}/images and their masks (same file names) in {root}/masks"
            )
    pairs = []
    for image_folder, mask_folder in folders:
        if not mask_folder.is_dir():
            raise DataError(f"{image_folder}: its masks folder {mask_folder} is missing")
        masks = {p.stem: p for p in image_files(mask_folder)}
        for image in image_files(image_folder):
            if image.stem not in masks:
                raise DataError(
                    f"{image}: no mask with the same name in {mask_folder}; add it or remove the image"
                )
            pairs.append((image, masks[image.stem]))
    if not pairs:
        raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files)")
    return pairs


def read_labelled_folder(
    root: Path, *, image_mpp: float, mpp: float, held_out: Sequence[str] = ("test",)
) -> LabelledSet:
    """Decode a labelled folder into memory at ``mpp`` (images are taken to be at ``image_mpp``)."""
    root = Path(root)
    splits = read_split_table(root)
    factor = scale_factor(image_mpp, mpp)
    items = []
    skipped = 0
    for image_path, mask_path in find_pairs(root):
        split = splits.get(image_path.stem)
        if is_held_out(split, held_out):
            skipped += 1
            continue
        image, mask = read_rgb(image_path), read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"{image_path} is {image.shape[1]}x{image.shape[0]} but its mask {mask_path} is "
                f"{mask.shape[1]}x{mask.shape[0]}; they must be the same size"
            )
        image, resampled = resample_pair(image, mask, factor)
        assert resampled is not None
        items.append(LabelledImage(image_path.stem, group_id(image_path.stem), split, image, resampled))
    if skipped:
        log.info("%s: left out %d held-out images (split.tsv: %s)", root, skipped, ", ".join(held_out))
    if not items:
        raise DataError(f"{root}: every image is held out by split.tsv; nothing left to train on")
    return LabelledSet(dataset_name(root), root, dataset_license(root), tuple(items))


def split_by_group(
    dataset: LabelledSet, *, val_fraction: float, rng: np.random.Generator
) -> tuple[LabelledSet, LabelledSet]:
    """(train, validation) without splitting a slide or patient: split.tsv's val rows, else random groups."""
    marked = [item for item in dataset.images if is_validation(item.split)]
    if marked:
        val_groups = {item.group for item in marked}
    else:
        groups = dataset.groups
        count = round(val_fraction * len(groups))
        count = min(max(count, 1 if val_fraction > 0 else 0), len(groups) - 1)
        val_groups = set(rng.choice(groups, size=count, replace=False).tolist()) if count > 0 else set()
    train = [item for item in dataset.images if item.group not in val_groups]
    val = [item for item in dataset.images if item.group in val_groups]
    return dataset.subset(train), dataset.subset(val)


def channel_stats(datasets: Sequence[LabelledSet]) -> tuple[list[float], list[float]]:
    """Mean and std of each RGB channel (0-1 scale) over all pixels of the datasets' images."""
    total = np.zeros(3)
    squares = np.zeros(3)
    count = 0
    for dataset in datasets:
        for item in dataset.images:
            pixels = item.image.reshape(-1, 3).astype(np.float64) / 255.0
            total += pixels.sum(axis=0)
            squares += (pixels**2).sum(axis=0)
            count += len(pixels)
    if count == 0:
        raise DataError("no training images to compute the normalisation from")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    return [round(float(v), 6) for v in mean], [round(max(float(v), 1e-3), 6) for v in std]


# ------------------------------------------------------------------------------------------------ patches
def pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad an image smaller than ``size`` on either axis (white would teach the net about glass)."""
    height, width = image.shape[:2]
    if height >= size and width >= size:
        return image
    pad = [(0, max(0, size - height)), (0, max(0, size - width))] + [(0, 0)] * (image.ndim - 2)
    mode = "reflect" if size - height < height and size - width < width else "symmetric"
    return np.pad(image, pad, mode=mode)  # type: ignore[call-overload]


def random_crop(rng: np.random.Generator, arrays: Sequence[np.ndarray], size: int) -> list[np.ndarray]:
    """The same random ``size`` x ``size`` window of several arrays of one shape."""
    arrays = [pad_to(array, size) for array in arrays]
    height, width = arrays[0].shape[:2]
    y = int(rng.integers(0, height - size + 1))
    x = int(rng.integers(0, width - size + 1))
    return [array[y : y + size, x : x + size] for array in arrays]


def sample_labelled(
    rng: np.random.Generator, datasets: Sequence[LabelledSet], *, count: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random patches: a dataset uniformly (so sources weigh alike), an image, then a window.

    Returns uint8 images (count, size, size, 3) and uint8 masks (count, size, size) of 0/1.
    """
    usable = [dataset for dataset in datasets if dataset.images]
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    masks = np.empty((count, size, size), dtype=np.uint8)
    for i in range(count):
        dataset = usable[int(rng.integers(len(usable)))]
        item = dataset.images[int(rng.integers(len(dataset.images)))]
        images[i], masks[i] = random_crop(rng, [item.image, item.mask], size)
    return images, masks


# ------------------------------------------------------------------------------------------------- targets
class ImagePool:
    """Unlabelled images held in memory at the working resolution."""

    def __init__(self, name: str, root: Path, images: Sequence[np.ndarray]) -> None:
        self.name, self.root, self.license = name, root, dataset_license(root)
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, rng: np.random.Generator, *, count: int, size: int) -> np.ndarray:
        out = np.empty((count, size, size, 3), dtype=np.uint8)
        for i in range(count):
            out[i] = random_crop(rng, [self.images[int(rng.integers(len(self.images)))]], size)[0]
        return out


SlideTile = tuple[Path, float, Region]
"""A target slide's tissue tile: the slide, its working scale, and the tile's region in the working grid."""


class SlidePool:
    """Tissue tiles of whole slides (listed by :func:`slide_tiles`), read at random on demand.

    Readers are opened lazily by path and kept for the pool's life (one training process; never pickled).
    """

    def __init__(
        self, name: str, root: Path, tiles: Sequence[SlideTile], *, slide_mpp: float | None = None
    ) -> None:
        self.name, self.root, self.license = name, root, dataset_license(root)
        self.tiles = list(tiles)
        if not self.tiles:
            raise DataError(f"{root}: no tissue found in its slides; check that they are H&E slides")
        self.slide_mpp = slide_mpp
        self._readers: dict[Path, SlideReader] = {}

    def __len__(self) -> int:
        return len(self.tiles)

    def _reader(self, path: Path) -> SlideReader:
        from wsiuda.io import open_slide

        if path not in self._readers:
            self._readers[path] = open_slide(path, slide_mpp=self.slide_mpp)
        return self._readers[path]

    def sample(self, rng: np.random.Generator, *, count: int, size: int) -> np.ndarray:
        from wsiuda.tiling import read_working_region

        out = np.empty((count, size, size, 3), dtype=np.uint8)
        for i in range(count):
            path, scale, region = self.tiles[int(rng.integers(len(self.tiles)))]
            # A random offset of up to half a tile, so patches are not locked to the grid.
            dy, dx = (int(v) for v in rng.integers(-size // 2, size // 2 + 1, 2))
            window = Region(region.y + dy, region.x + dx, size, size)
            out[i] = read_working_region(self._reader(path), window, scale=scale)
        return out

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


def slide_tiles(reader: SlideReader, *, mpp: float, size: int) -> list[SlideTile]:
    """The tissue tiles of an open slide at ``mpp``; a SlideError where it cannot be (e.g. it has no mpp)."""
    from wsiuda.tiling import tile_grid, tissue_mask, working_scale, working_shape

    scale = working_scale(reader.info, mpp)
    shape = working_shape(reader.info.shape, scale)
    tiles = tile_grid(shape, tile=size, tissue=tissue_mask(reader), scale=scale, min_tissue=MIN_TISSUE)
    if not tiles:
        log.warning("%s: no tissue tiles found; it adds nothing to the target", reader.info.path)
    return [(Path(reader.info.path), scale, region) for region in tiles]


class StorePool:
    """Tiles of finished ``wsiuda tile`` stores (zarr): random windows of them, halo included."""

    def __init__(self, name: str, root: Path, stores: Sequence[Path], *, mpp: float) -> None:
        self.name, self.root, self.license = name, root, dataset_license(root)
        self.stores: list[tuple[TileStore, float]] = []
        for path, store in each_usable(stores, open_complete_store):
            if len(store):
                self.stores.append((store, scale_factor(float(store.attrs.get("target_mpp", mpp)), mpp)))
            else:
                log.warning("%s holds no tiles (no tissue in its slide); it adds nothing to the target", path)
        if not self.stores:
            raise DataError(f"{root}: its tile stores hold no tiles; check that their slides are H&E slides")

    def __len__(self) -> int:
        return sum(len(store) for store, _ in self.stores)

    def sample(self, rng: np.random.Generator, *, count: int, size: int) -> np.ndarray:
        out = np.empty((count, size, size, 3), dtype=np.uint8)
        for i in range(count):
            store, factor = self.stores[int(rng.integers(len(self.stores)))]
            tile = store.read_tile(int(rng.integers(len(store))))
            out[i] = random_crop(rng, [resample_pair(tile, None, factor)[0]], size)[0]
        return out


def open_complete_store(path: Path) -> TileStore:
    """A tile store that ``wsiuda tile`` finished: an interrupted one would train on part of its slide."""
    from wsiuda.io.store import INCOMPLETE, TileStore

    try:
        store = TileStore.open(path)
    except OutputError as error:
        raise DataError(str(error)) from None
    if not store.is_complete:
        raise DataError(f"{path}: {INCOMPLETE}")
    return store


TargetPool = ImagePool | SlidePool | StorePool
T = TypeVar("T")


def each_usable(paths: Sequence[Path], open_one: Callable[[Path], T]) -> list[tuple[Path, T]]:
    """``open_one`` of each path, which raises DataError for an unusable one.

    Among several target files, an unusable one (corrupt, unreadable, without mpp) is left out with one
    warning that names it and why, and training goes on with the rest; a target given as one file stands
    or falls with it.
    """
    if len(paths) == 1:
        return [(paths[0], open_one(paths[0]))]
    opened = []
    for path in paths:
        try:
            opened.append((path, open_one(path)))
        except DataError as error:
            message = str(error) if str(path) in str(error) else f"{path}: {error}"
            log.warning("left out of the target: %s", message)
    if not opened:
        raise DataError(
            f"{paths[0].parent}: none of its {len(paths)} target files is usable (each is named in a "
            "warning above); fix or remove them"
        )
    return opened


def open_target(
    path: Path,
    *,
    image_mpp: float,
    mpp: float,
    size: int,
    held_out: Sequence[str] = ("test",),
    slide_mpp: float | None = None,
) -> TargetPool:
    """A target source: a folder of images (or with an images/ folder), a folder of slides, one slide, or
    tile stores written by ``wsiuda tile`` (one store, or a folder of them).

    Plain images (PNG/JPEG, non-pyramidal TIFF) are decoded into memory, taken to be at ``image_mpp``;
    pyramidal slides are tiled on the fly at ``mpp`` from their own metadata, or at ``slide_mpp`` (level-0
    µm/px) where given. Masks beside the images are never read: the target is unlabelled. Rows of split.tsv
    marked held-out are left out. In a folder, an unusable file is left out with a warning (see
    :func:`each_usable`).
    """
    from wsiuda.io.store import is_tile_store

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; pass a folder of target images or slides")
    root = path if path.is_dir() else path.parent
    if is_tile_store(path):
        return StorePool(dataset_name(path.parent), path.parent, [path], mpp=mpp)
    stores = sorted(p for p in path.iterdir() if is_tile_store(p)) if path.is_dir() else []
    if stores:
        return StorePool(dataset_name(path), path, stores, mpp=mpp)
    factor = scale_factor(image_mpp, mpp)

    def read(candidate: Path) -> np.ndarray | list[SlideTile]:
        return read_target_file(candidate, image_factor=factor, mpp=mpp, size=size, slide_mpp=slide_mpp)

    opened = [content for _, content in each_usable(target_files(path, held_out), read)]
    images = [content for content in opened if isinstance(content, np.ndarray)]
    slides = [content for content in opened if isinstance(content, list)]
    if images and slides:
        raise DataError(f"{path}: mixes plain images and whole slides; pass them as two --target options")
    if slides:
        return SlidePool(
            dataset_name(root), root, [tile for tiles in slides for tile in tiles], slide_mpp=slide_mpp
        )
    return ImagePool(dataset_name(root), root, images)


def target_files(path: Path, held_out: Sequence[str]) -> list[Path]:
    """The image and slide files of a target: the file itself, or those of a folder (or its images/)."""
    if not path.is_dir():
        return [path]
    folder = path / "images" if (path / "images").is_dir() else path
    splits = read_split_table(path)
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES + SLIDE_SUFFIXES
    )
    files = [p for p in files if not is_held_out(splits.get(p.stem), held_out)]
    if not files:
        raise DataError(
            f"{path}: no images or slides found (looked for {', '.join(IMAGE_SUFFIXES + SLIDE_SUFFIXES)})"
        )
    return files


def read_target_file(
    path: Path, *, image_factor: float, mpp: float, size: int, slide_mpp: float | None
) -> np.ndarray | list[SlideTile]:
    """A plain image's pixels resized by ``image_factor``, or a slide's tissue tiles at ``mpp``."""
    from wsiuda.io import open_slide

    try:
        with open_slide(path, slide_mpp=slide_mpp) as reader:
            if reader.info.backend != "plain":
                return slide_tiles(reader, mpp=mpp, size=size)
            height, width = reader.info.shape
            pixels = reader.read_level(Region(0, 0, height, width), level=0)
            return resample_pair(pixels, None, image_factor)[0]
    except SlideError as error:
        raise DataError(str(error)) from None
