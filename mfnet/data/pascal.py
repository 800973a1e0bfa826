"""PASCAL-5i: VOC2012 images with SegmentationClassAug labels, split into four class folds.

On-disk layout (``voc_root`` = ``VOCdevkit/VOC2012``; build the last three entries with
``python -m mfnet.data.prepare_pascal``)::

    JPEGImages/<id>.jpg                       RGB images
    SegmentationClassAug/<id>.png             index PNGs, 0 background, 1..20 classes, 255 ignore
    ImageSets/SegmentationAug/{trainaug,val}.txt
    mfnet_lists/{trainaug,val}.json           per-class image lists with pixel counts (a cache)

Fold i holds out VOC ids 5i+1..5i+5 as novel (test) classes; the other 15 are its base classes.
``PascalImages`` is the labelled-image collection an episode sampler draws from; it applies the
small-object filter and BAM's optional removal of training images that show a novel class.
"""

from __future__ import annotations

import json
import logging
import operator
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mfnet_runtime.atomic import atomic_write_bytes

from ..progress import progress_bar
from .errors import DatasetArgumentError, DatasetError

log = logging.getLogger(__name__)

NUM_CLASSES = 20
NUM_FOLDS = 4
CLASSES_PER_FOLD = 5
IGNORE_INDEX = 255  # VOC's object-boundary / "difficult" label
CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
SPLITS = ("trainaug", "val")
ROLES = ("train", "test")
LABEL_DIR = "SegmentationClassAug"
IMAGE_DIR = "JPEGImages"
LIST_DIR = Path("ImageSets") / "SegmentationAug"
CACHE_DIR = "mfnet_lists"
CACHE_VERSION = 1
DOWNLOAD_SOURCES = (
    "the VOC2012 trainval tar (VOCtrainval_11-May-2012.tar) from the PASCAL VOC site and the SBD "
    "benchmark_RELEASE (benchmark.tgz) from the Berkeley SBD page"
)


_REBUILD_LABELS = (
    "SegmentationClassAug must hold index PNGs (VOC class ids), not colour images: delete the "
    "bad files and re-run `python -m mfnet.data.prepare_pascal` to rebuild them."
)


def prepare_command(voc_root: str | os.PathLike[str]) -> str:
    """The shell command that builds labels, lists and caches under ``voc_root``."""
    return (
        f"python -m mfnet.data.prepare_pascal --voc-root {voc_root} "
        "--sbd-root <path/to/benchmark_RELEASE>"
    )


def _missing_prepared(voc_root: Path, what: Path) -> DatasetError:
    return DatasetError(
        f"{what} not found. Build it with `{prepare_command(voc_root)}` "
        f"(needs {DOWNLOAD_SOURCES}; see docs/pascal.md)."
    )


def check_fold(fold: int) -> int:
    """Return ``fold`` if it is an int in 0..3, else raise ``DatasetArgumentError``."""
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < NUM_FOLDS:
        raise DatasetArgumentError(f"fold must be an int in 0..{NUM_FOLDS - 1}, got {fold!r}")
    return fold


def check_class_id(class_id: int) -> int:
    """Return ``class_id`` as an int if it is a VOC class id 1..20, else raise."""
    value = operator.index(class_id) if isinstance(class_id, (int, np.integer)) else -1
    if isinstance(class_id, bool) or not 1 <= value <= NUM_CLASSES:
        raise DatasetArgumentError(
            f"class id must be a VOC class id in 1..{NUM_CLASSES} (0 is background), "
            f"got {class_id!r}"
        )
    return value


def novel_classes(fold: int) -> tuple[int, ...]:
    """The five held-out VOC ids of ``fold``: 5*fold+1 .. 5*fold+5."""
    start = CLASSES_PER_FOLD * check_fold(fold) + 1
    return tuple(range(start, start + CLASSES_PER_FOLD))


def base_classes(fold: int) -> tuple[int, ...]:
    """The 15 training VOC ids of ``fold`` (all classes but its novel ones), ascending."""
    novel = set(novel_classes(fold))
    return tuple(c for c in range(1, NUM_CLASSES + 1) if c not in novel)


def voc_palette() -> np.ndarray:
    """VOC's colour map: uint8 [256, 3]; row k is the RGB colour of label k (1 -> 128,0,0;
    255 -> 224,224,192). Label bits 3j, 3j+1, 3j+2 set bit 7-j of red, green and blue."""
    labels = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            bit = (labels >> (3 * shift + channel)) & 1
            palette[:, channel] |= bit << (7 - shift)
    return palette.astype(np.uint8)


def split_list_path(voc_root: str | os.PathLike[str], split: str) -> Path:
    """``<voc_root>/ImageSets/SegmentationAug/<split>.txt`` (one image id a line)."""
    return Path(voc_root) / LIST_DIR / f"{split}.txt"


def read_id_list(path: Path) -> list[str]:
    """Image ids from a list file, one per line (first token: VOC lists may add a flag column),
    in file order without duplicates."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DatasetError(f"image list {path} not found") from exc
    ids = (line.split()[0] for line in lines if line.strip())
    return list(dict.fromkeys(ids))


def check_label_values(label: np.ndarray, path: Path, *, advice: str | None = None) -> np.ndarray:
    """Return ``label`` (uint8 [H, W]) if every value is in 0..20 or 255, else raise naming
    ``path``, the offending values and ``advice`` (default: how to rebuild SegmentationClassAug)."""
    counts = np.bincount(label.ravel(), minlength=256)
    bad = np.flatnonzero(counts[NUM_CLASSES + 1 : IGNORE_INDEX]) + NUM_CLASSES + 1
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise DatasetError(
            f"label {path} holds values outside 0..{NUM_CLASSES} and {IGNORE_INDEX}: {shown}. "
            + (advice or _REBUILD_LABELS)
        )
    return label


def read_label(path: Path) -> np.ndarray:
    """An index label PNG (mode "L", or "P" read as palette indices) -> uint8 [H, W], values
    0..20 and 255. Raises ``DatasetError`` for a missing, corrupt, colour or out-of-range file."""
    if not path.is_file():
        raise DatasetError(f"label {path} not found")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            label = np.asarray(image) if mode in ("L", "P") else None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"label {path} is not a readable PNG ({exc}); re-extract it") from exc
    if label is None:
        raise DatasetError(
            f"label {path} has image mode {mode!r}; expected an index PNG (mode 'L' or 'P'). "
            + _REBUILD_LABELS
        )
    return check_label_values(label.astype(np.uint8, copy=False), path)


def read_image(path: Path) -> np.ndarray:
    """A JPEG -> uint8 [H, W, 3] RGB. Raises ``DatasetError`` for a missing or corrupt file."""
    if not path.is_file():
        raise DatasetError(f"image {path} not found; re-extract JPEGImages from {DOWNLOAD_SOURCES}")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"image {path} is not a readable image ({exc}); re-extract it") from exc


@dataclass(frozen=True)
class ClassIndex:
    """Per-class image lists of one split.

    ``pixels[c]`` maps each image id that contains class c (1..20) to the number of pixels of
    class c in its label, in the order of the split's list; ``image_ids`` is the whole list.
    """

    split: str
    image_ids: tuple[str, ...]
    pixels: Mapping[int, Mapping[str, int]]


def cache_path(voc_root: str | os.PathLike[str], split: str) -> Path:
    """``<voc_root>/mfnet_lists/<split>.json``."""
    return Path(voc_root) / CACHE_DIR / f"{split}.json"


def _signature(voc_root: Path, split: str) -> dict[str, int | str]:
    """What a cache must match to be reused: the label folder's PNG count and mtime, and the
    split list's size and mtime (adding, removing or renaming labels changes the folder mtime)."""
    label_dir = voc_root / LABEL_DIR
    with os.scandir(label_dir) as entries:
        count = sum(1 for e in entries if e.name.endswith(".png") and not e.name.startswith("."))
    list_stat = split_list_path(voc_root, split).stat()
    return {
        "version": CACHE_VERSION,
        "split": split,
        "label_files": count,
        "label_dir_mtime_ns": label_dir.stat().st_mtime_ns,
        "list_bytes": list_stat.st_size,
        "list_mtime_ns": list_stat.st_mtime_ns,
    }


def check_layout(voc_root: str | os.PathLike[str], split: str) -> Path:
    """Return ``voc_root`` as a Path after checking that the root, JPEGImages,
    SegmentationClassAug and the split list exist; raise ``DatasetError`` naming what is missing
    and how to get it."""
    if split not in SPLITS:
        raise DatasetArgumentError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(voc_root)
    if not root.is_dir():
        raise DatasetError(
            f"VOC root {root} not found. Download {DOWNLOAD_SOURCES}, extract them, and pass "
            f"VOCdevkit/VOC2012 as the root; then run `{prepare_command(root)}`."
        )
    if not (root / IMAGE_DIR).is_dir():
        raise DatasetError(
            f"{root / IMAGE_DIR} not found: {root} must be the VOCdevkit/VOC2012 folder of "
            f"{DOWNLOAD_SOURCES}."
        )
    for needed in (root / LABEL_DIR, split_list_path(root, split)):
        if not needed.exists():
            raise _missing_prepared(root, needed)
    return root


def build_class_index(
    voc_root: str | os.PathLike[str], split: str, *, progress: bool = True
) -> ClassIndex:
    """Read every label of ``split`` once and count the pixels of each class (no cache)."""
    root = check_layout(voc_root, split)
    image_ids = tuple(read_id_list(split_list_path(root, split)))
    pixels: dict[int, dict[str, int]] = {c: {} for c in range(1, NUM_CLASSES + 1)}
    for image_id in progress_bar(image_ids, f"indexing {split}", enabled=progress, leave=False):
        path = root / LABEL_DIR / f"{image_id}.png"
        if not path.is_file():
            raise _missing_prepared(root, path)
        counts = np.bincount(read_label(path).ravel(), minlength=256)
        for class_id in np.flatnonzero(counts[1 : NUM_CLASSES + 1]) + 1:
            pixels[int(class_id)][image_id] = int(counts[class_id])
    return ClassIndex(split, image_ids, pixels)


def load_class_index(
    voc_root: str | os.PathLike[str], split: str, *, rebuild: bool = False, progress: bool = True
) -> ClassIndex:
    """The cached ``ClassIndex`` of ``split`` if its signature matches the files on disk, else a
    fresh one, written back to the cache (skipped with a warning when the root is read-only)."""
    root = check_layout(voc_root, split)
    signature = _signature(root, split)
    path = cache_path(root, split)
    if not rebuild and path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached["signature"] == signature:
                pixels = {
                    int(c): {image_id: int(n) for image_id, n in entries}
                    for c, entries in cached["classes"].items()
                }
                return ClassIndex(split, tuple(cached["image_ids"]), pixels)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache is simply rebuilt
    index = build_class_index(root, split, progress=progress)
    payload = {
        "signature": signature,
        "image_ids": list(index.image_ids),
        # Lists of [image id, pixel count] pairs keep the split's order in any JSON reader.
        "classes": {str(c): [[i, n] for i, n in index.pixels[c].items()] for c in index.pixels},
    }
    try:
        atomic_write_bytes(path, json.dumps(payload, separators=(",", ":")).encode("utf-8"))
    except OSError as exc:
        log.warning("could not write the class-list cache %s: %s", path, exc)
    return index


class PascalImages:
    """The labelled images of one PASCAL-5i split, fold and role.

    Args:
        voc_root: the ``VOCdevkit/VOC2012`` folder, prepared by ``mfnet.data.prepare_pascal``.
        split: "trainaug" (10,582 VOC+SBD images: training; PANet also tests on it) or "val"
            (the 1,449 VOC val images: the usual test source).
        fold: 0..3; its novel classes are VOC ids 5*fold+1 .. 5*fold+5.
        role: "train" samples the 15 base classes, "test" the 5 novel classes.
        min_object_pixels: an image is listed for class c only if c covers at least this many
            pixels at original resolution (0 = any pixel, as PANet; 2048 = 2*32*32, as
            PFENet/BAM/OSLSM).
        drop_novel_images: role "train" only (BAM): drop every image with any pixel of a novel
            class. Otherwise such images stay and the episode sampler maps non-episode classes to
            background (PANet, PFENet).
    """

    def __init__(
        self,
        voc_root: str | os.PathLike[str],
        split: str,
        fold: int,
        role: str,
        *,
        min_object_pixels: int = 0,
        drop_novel_images: bool = False,
    ) -> None:
        if role not in ROLES:
            raise DatasetArgumentError(f"role must be one of {ROLES}, got {role!r}")
        check_fold(fold)
        if split not in SPLITS:
            raise DatasetArgumentError(f"split must be one of {SPLITS}, got {split!r}")
        if min_object_pixels < 0:
            raise DatasetArgumentError(f"min_object_pixels must be >= 0, got {min_object_pixels}")
        if drop_novel_images and role == "test":
            raise DatasetArgumentError(
                "drop_novel_images removes images that show a novel class; it applies to role "
                "'train' only, never to the test images"
            )
        self.voc_root = check_layout(voc_root, split)
        self.split, self.fold, self.role = split, fold, role
        self.min_object_pixels = int(min_object_pixels)
        self.drop_novel_images = bool(drop_novel_images)
        self.novel = novel_classes(fold)
        self.classes: tuple[int, ...] = base_classes(fold) if role == "train" else self.novel

        index = load_class_index(self.voc_root, split)
        dropped: set[str] = set()
        if drop_novel_images:
            # Any novel pixel counts, however small (BAM checks class presence, not area).
            dropped = {image_id for c in self.novel for image_id in index.pixels[c]}
        self._images = {
            c: tuple(
                image_id
                for image_id, count in index.pixels[c].items()
                if count >= max(self.min_object_pixels, 1) and image_id not in dropped
            )
            for c in self.classes
        }

    def images_with(self, class_id: int) -> tuple[str, ...]:
        """Ids of the images that contain ``class_id`` (one of ``classes``), after the filters,
        in the order of the split's list. May be empty."""
        class_id = check_class_id(class_id)
        if class_id not in self._images:
            kind = "novel" if class_id in self.novel else "base"
            raise DatasetArgumentError(
                f"class {class_id} ({CLASS_NAMES[class_id]}) is a {kind} class of fold "
                f"{self.fold}; role {self.role!r} samples only {self.classes}"
            )
        return self._images[class_id]

    def load(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Image uint8 [H, W, 3] RGB and label uint8 [H, W] with raw VOC ids (0 background,
        1..20, 255 ignore; no remapping: the episode sampler decides what is background)."""
        image_path = self.voc_root / IMAGE_DIR / f"{image_id}.jpg"
        label_path = self.voc_root / LABEL_DIR / f"{image_id}.png"
        if not label_path.is_file():
            raise _missing_prepared(self.voc_root, label_path)
        image, label = read_image(image_path), read_label(label_path)
        if image.shape[:2] != label.shape:
            raise DatasetError(
                f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label "
                f"{label_path} is {label.shape[1]}x{label.shape[0]}; rebuild the label"
            )
        return image, label

    def __repr__(self) -> str:
        return (
            f"PascalImages(split={self.split!r}, fold={self.fold}, role={self.role!r}, "
            f"classes={self.classes}, min_object_pixels={self.min_object_pixels}, "
            f"drop_novel_images={self.drop_novel_images})"
        )
