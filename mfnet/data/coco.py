"""COCO-20i: COCO 2014 instance annotations as semantic labels for few-shot segmentation.

The 80 COCO categories are renumbered 1..80 in ascending COCO ``category_id`` (1 person ..
80 toothbrush); 0 is background and 255 ignore. The renumbering is the fixed official table below,
not derived from a file, so a file listing only some categories still maps each to its COCO-20i id.
Folds: split "A" (contiguous, PANet/PPNet and the MFNet paper) holds out ids 20i+1..20i+20 in fold
i; split "B" (interleaved, FWB; PFENet, HSNet, DENet) holds out {4k+i+1 : k = 0..19}.

``CocoImages`` rasterises each image's instances into one semantic label with pycocotools, caches
the labels as PNGs and the per-class image lists as JSON, and serves (image, label) pairs. See
docs/coco.md for the download, the layout, the cache and its cost.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from mfnet.data.synthetic import IGNORE_INDEX
from mfnet_runtime.atomic import atomic_write_bytes

from ..progress import progress_bar
from .errors import DatasetArgumentError, DatasetError

NUM_COCO_CLASSES = 80
NUM_COCO_FOLDS = 4
FOLD_SPLITS = ("A", "B")
SPLITS = ("train", "val")
ROLES = ("train", "test")
DOWNLOAD_HINT = (
    "COCO 2014 is downloaded as train2014.zip, val2014.zip and annotations_trainval2014.zip "
    "from cocodataset.org (https://cocodataset.org/#download); unzip all three into one folder"
)
# Bump when the rasterisation rules change, so old caches are rebuilt.
CACHE_FORMAT = 1
INDEX_NAME = "class_index.json"

# (COCO category id, name) of the 80 instance categories of COCO 2014, in ascending id.
_COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"),
    (2, "bicycle"),
    (3, "car"),
    (4, "motorcycle"),
    (5, "airplane"),
    (6, "bus"),
    (7, "train"),
    (8, "truck"),
    (9, "boat"),
    (10, "traffic light"),
    (11, "fire hydrant"),
    (13, "stop sign"),
    (14, "parking meter"),
    (15, "bench"),
    (16, "bird"),
    (17, "cat"),
    (18, "dog"),
    (19, "horse"),
    (20, "sheep"),
    (21, "cow"),
    (22, "elephant"),
    (23, "bear"),
    (24, "zebra"),
    (25, "giraffe"),
    (27, "backpack"),
    (28, "umbrella"),
    (31, "handbag"),
    (32, "tie"),
    (33, "suitcase"),
    (34, "frisbee"),
    (35, "skis"),
    (36, "snowboard"),
    (37, "sports ball"),
    (38, "kite"),
    (39, "baseball bat"),
    (40, "baseball glove"),
    (41, "skateboard"),
    (42, "surfboard"),
    (43, "tennis racket"),
    (44, "bottle"),
    (46, "wine glass"),
    (47, "cup"),
    (48, "fork"),
    (49, "knife"),
    (50, "spoon"),
    (51, "bowl"),
    (52, "banana"),
    (53, "apple"),
    (54, "sandwich"),
    (55, "orange"),
    (56, "broccoli"),
    (57, "carrot"),
    (58, "hot dog"),
    (59, "pizza"),
    (60, "donut"),
    (61, "cake"),
    (62, "chair"),
    (63, "couch"),
    (64, "potted plant"),
    (65, "bed"),
    (67, "dining table"),
    (70, "toilet"),
    (72, "tv"),
    (73, "laptop"),
    (74, "mouse"),
    (75, "remote"),
    (76, "keyboard"),
    (77, "cell phone"),
    (78, "microwave"),
    (79, "oven"),
    (80, "toaster"),
    (81, "sink"),
    (82, "refrigerator"),
    (84, "book"),
    (85, "clock"),
    (86, "vase"),
    (87, "scissors"),
    (88, "teddy bear"),
    (89, "hair drier"),
    (90, "toothbrush"),
)
# COCO category id of class c (1..80) at index c - 1, and the class names likewise.
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(cat for cat, _ in _COCO_CATEGORIES)
COCO_CLASS_NAMES: tuple[str, ...] = tuple(name for _, name in _COCO_CATEGORIES)
# Read-only views, so no caller can alter the renumbering for everyone else.
CATEGORY_TO_CLASS: Mapping[int, int] = MappingProxyType(
    {cat: i + 1 for i, cat in enumerate(COCO_CATEGORY_IDS)}
)
CLASS_TO_CATEGORY: Mapping[int, int] = MappingProxyType(
    {i + 1: cat for i, cat in enumerate(COCO_CATEGORY_IDS)}
)


def _check_class(class_id: int) -> int:
    if (
        isinstance(class_id, bool)
        or not isinstance(class_id, (int, np.integer))
        or not (1 <= class_id <= NUM_COCO_CLASSES)
    ):
        raise DatasetArgumentError(
            f"COCO-20i class ids are 1..{NUM_COCO_CLASSES}, got {class_id!r}"
        )
    return int(class_id)


def coco_class_name(class_id: int) -> str:
    """Name of COCO-20i class ``class_id`` (1..80), e.g. 1 -> "person", 80 -> "toothbrush"."""
    return COCO_CLASS_NAMES[_check_class(class_id) - 1]


def coco_class_from_category(category_id: int) -> int:
    """COCO-20i class id (1..80) of a COCO ``category_id`` (1..90 with gaps), e.g. 90 -> 80."""
    if category_id not in CATEGORY_TO_CLASS:
        raise DatasetArgumentError(
            f"{category_id!r} is not one of the 80 COCO instance category ids "
            f"(1..90 without {sorted(set(range(1, 91)) - set(COCO_CATEGORY_IDS))})"
        )
    return CATEGORY_TO_CLASS[category_id]


def coco_category_from_class(class_id: int) -> int:
    """COCO ``category_id`` of COCO-20i class ``class_id`` (1..80), e.g. 80 -> 90."""
    return CLASS_TO_CATEGORY[_check_class(class_id)]


def _check_fold(fold: int, split: str) -> None:
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < NUM_COCO_FOLDS:
        raise DatasetArgumentError(
            f"COCO-20i fold must be an int in 0..{NUM_COCO_FOLDS - 1}, got {fold!r}"
        )
    if split not in FOLD_SPLITS:
        raise DatasetArgumentError(
            f"unknown COCO-20i fold split {split!r}: use 'A' (contiguous ids 20i+1..20i+20; "
            "PANet, PPNet, MFNet) or 'B' (interleaved ids 4k+i+1; FWB, PFENet, HSNet, DENet)"
        )


def coco_novel_classes(fold: int, split: str = "A") -> tuple[int, ...]:
    """The 20 novel (test) class ids (1..80, ascending) of ``fold`` (0..3) under fold ``split``:
    "A" -> 20*fold+1 .. 20*fold+20, "B" -> fold+1, fold+5, .., fold+77."""
    _check_fold(fold, split)
    if split == "A":
        return tuple(range(20 * fold + 1, 20 * fold + 21))
    return tuple(range(fold + 1, NUM_COCO_CLASSES + 1, NUM_COCO_FOLDS))


def coco_base_classes(fold: int, split: str = "A") -> tuple[int, ...]:
    """The 60 base (training) class ids (1..80, ascending): those not novel in ``fold``."""
    novel = set(coco_novel_classes(fold, split))
    return tuple(c for c in range(1, NUM_COCO_CLASSES + 1) if c not in novel)


def _require_pycocotools() -> Any:
    """The ``pycocotools.coco.COCO`` class, or a DatasetError saying how to install it."""
    try:
        from pycocotools.coco import COCO
    except ImportError as err:
        raise DatasetError(
            "rasterising COCO annotations needs pycocotools: pip install pycocotools "
            "(or pip install 'mfnet[data]')"
        ) from err
    return COCO


def _read_annotations(path: Path) -> dict[str, Any]:
    """Parse and sanity-check a COCO instances json; categories must be COCO 2014's."""
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(
            f"{path} is not valid JSON ({err}); the file is corrupt or truncated, re-extract it "
            f"from annotations_trainval2014.zip. {DOWNLOAD_HINT}"
        ) from err
    if not isinstance(data, dict) or not all(
        isinstance(data.get(key), list) for key in ("images", "annotations", "categories")
    ):
        raise DatasetError(
            f"{path} is not a COCO instances file (needs lists 'images', 'annotations' and "
            "'categories')"
        )
    for cat in data["categories"]:
        cat_id, name = (cat.get("id"), cat.get("name")) if isinstance(cat, dict) else (cat, None)
        # cat_id is any JSON value; one that is not a category id gets None
        class_id = CATEGORY_TO_CLASS.get(cat_id)  # type: ignore[arg-type]
        if class_id is None or COCO_CLASS_NAMES[class_id - 1] != name:
            raise DatasetError(
                f"{path}: category {cat_id!r} ({name!r}) is not a COCO 2014 instance category; "
                "only the 80 categories of instances_{train,val}2014.json are supported"
            )
    return data


def _coco_from_dataset(data: dict[str, Any]) -> Any:
    """A pycocotools COCO index over already parsed ``data`` (its chatter on stdout muted)."""
    coco = _require_pycocotools()()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _instance_mask(coco: Any, ann: dict[str, Any], height: int, width: int) -> np.ndarray | None:
    """bool [H, W] mask of one annotation (polygons, uncompressed or compressed RLE), or None
    when it has no usable geometry."""
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        # pycocotools reads a 4-number "polygon" as a box; a polygon needs >= 3 points.
        segm = [poly for poly in segm if len(poly) >= 6]
        if not segm:
            return None
        ann = {**ann, "segmentation": segm}
    elif not isinstance(segm, dict) or "counts" not in segm:
        return None
    try:
        mask = coco.annToMask(ann)
    except Exception as err:  # pycocotools raises bare TypeError/ValueError/Exception on bad RLE
        raise DatasetError(f"annotation {ann.get('id')!r} has an unreadable mask: {err}") from err
    if mask.shape != (height, width):
        raise DatasetError(
            f"annotation {ann.get('id')!r}: mask is {mask.shape}, its image is {(height, width)}"
        )
    return mask.astype(bool)


def rasterise_label(coco: Any, image_id: int) -> np.ndarray:
    """Semantic label of one COCO image: uint8 [H, W], 0 background, 1..80 class, 255 ignore.

    Non-crowd instances are visited in ascending mask area and each claims only pixels no
    smaller instance has claimed, so an object lying on a larger one (a cup on a table) stays
    visible. Crowd regions (``iscrowd=1``) become 255 where no non-crowd instance covers them:
    they group many objects in one loose outline, so their pixels are neither reliably
    background nor reliably one object.
    """
    info = coco.imgs[image_id]
    height, width = int(info["height"]), int(info["width"])
    label = np.zeros((height, width), np.uint8)
    instances: list[tuple[int, int, np.ndarray, int]] = []
    crowd = np.zeros((height, width), bool)
    for ann in coco.imgToAnns.get(image_id, []):
        mask = _instance_mask(coco, ann, height, width)
        if mask is None:
            continue
        if ann.get("iscrowd", 0):
            crowd |= mask
        else:
            class_id = CATEGORY_TO_CLASS.get(ann.get("category_id"))
            if class_id is None:
                raise DatasetError(
                    f"annotation {ann.get('id')!r} of image {image_id} has category_id "
                    f"{ann.get('category_id')!r}, not one of the 80 COCO instance categories"
                )
            instances.append((int(mask.sum()), int(ann.get("id", 0)), mask, class_id))
    for _, _, mask, class_id in sorted(instances, key=lambda item: item[:2]):
        label[mask & (label == 0)] = class_id
    label[crowd & (label == 0)] = IGNORE_INDEX
    return label


def _write_label_png(path: Path, label: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(label).save(buf, format="PNG")  # uint8 [H, W] -> mode "L"
    atomic_write_bytes(path, buf.getvalue())


def _read_label_png(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """Cached label uint8 [H, W], or None when absent, unreadable or of the wrong size."""
    try:
        with Image.open(path) as img:
            label = np.asarray(img.convert("L") if img.mode != "L" else img, np.uint8)
    except (OSError, SyntaxError, ValueError):
        return None
    return label if label.shape == shape else None


class CocoImages:
    """Labelled COCO 2014 images of one split, restricted to one fold's base or novel classes.

    Args:
        coco_root: folder holding ``train2014/``, ``val2014/`` and ``annotations/``.
        split: "train" (train2014) or "val" (val2014).
        fold: 0..3.
        role: "train" exposes the fold's 60 base classes, "test" its 20 novel classes.
        fold_split: "A" (contiguous, default) or "B" (interleaved), see module docstring.
        min_object_pixels: an image counts for a class only if the class covers at least this
            many pixels of its label at original resolution (0 = any pixel; PFENet uses 2048).
        cache_dir: label PNGs and the class index; default ``<coco_root>/mfnet_cache/<split>2014``.

    Labels from ``load`` cover every class present (other folds' classes included); the episode
    sampler maps non-episode classes to background.
    """

    def __init__(
        self,
        coco_root: str | os.PathLike[str],
        split: str,
        fold: int,
        role: str,
        *,
        fold_split: str = "A",
        min_object_pixels: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        if split not in SPLITS:
            raise DatasetArgumentError(f"COCO split must be one of {SPLITS}, got {split!r}")
        if role not in ROLES:
            raise DatasetArgumentError(f"role must be one of {ROLES}, got {role!r}")
        _check_fold(fold, fold_split)
        if (
            isinstance(min_object_pixels, bool)
            or not isinstance(min_object_pixels, int)
            or (min_object_pixels < 0)
        ):
            raise DatasetArgumentError(
                f"min_object_pixels must be an int >= 0, got {min_object_pixels!r}"
            )
        self.root = Path(coco_root)
        self.split, self.fold, self.role, self.fold_split = split, fold, role, fold_split
        self.min_object_pixels = min_object_pixels
        self.classes: tuple[int, ...] = (
            coco_base_classes(fold, fold_split)
            if role == "train"
            else coco_novel_classes(fold, fold_split)
        )
        self.image_dir = self.root / f"{split}2014"
        self.annotation_file = self.root / "annotations" / f"instances_{split}2014.json"
        self._check_layout()
        default_cache = self.root / "mfnet_cache" / f"{split}2014"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache
        self._coco: Any = None  # parsed lazily: only needed for labels missing from the cache
        index = self._load_or_build_index()
        # image id -> (file name, height, width)
        self._images: dict[str, tuple[str, int, int]] = {
            k: (v[0], int(v[1]), int(v[2])) for k, v in index["images"].items()
        }
        self._by_class: dict[int, tuple[str, ...]] = {}
        for class_id in self.classes:
            counts = index["class_pixels"].get(str(class_id), {})
            keep = [i for i, n in counts.items() if n > 0 and n >= min_object_pixels]
            self._by_class[class_id] = tuple(sorted(keep, key=int))

    def __repr__(self) -> str:
        return (
            f"CocoImages({str(self.root)!r}, split={self.split!r}, fold={self.fold}, "
            f"role={self.role!r}, fold_split={self.fold_split!r}, "
            f"min_object_pixels={self.min_object_pixels})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy: do not ship the parsed annotation file (GBs for train).
        return {**self.__dict__, "_coco": None}

    def images_with(self, class_id: int) -> tuple[str, ...]:
        """Image ids (str, ascending) whose label holds ``class_id`` (one of ``self.classes``)
        on at least ``max(1, min_object_pixels)`` pixels."""
        class_id = _check_class(class_id)
        if class_id not in self._by_class:
            kind = "base" if self.role == "train" else "novel"
            raise DatasetArgumentError(
                f"class {class_id} ({coco_class_name(class_id)}) is not one of the {kind} classes "
                f"of COCO-20i fold {self.fold} (split {self.fold_split}, role {self.role!r})"
            )
        return self._by_class[class_id]

    def load(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 [H, W, 3] RGB, label uint8 [H, W]: 0 background, 1..80, 255 ignore)."""
        key = str(image_id)
        if key not in self._images:
            raise DatasetError(f"image id {image_id!r} is not in {self.annotation_file}")
        file_name, height, width = self._images[key]
        path = self.image_dir / file_name
        if not path.is_file():
            raise DatasetError(
                f"image {key} is listed in {self.annotation_file.name} but {path} is missing; "
                f"re-extract {self.split}2014.zip. {DOWNLOAD_HINT}"
            )
        try:
            with Image.open(path) as img:
                image = np.asarray(img.convert("RGB"), np.uint8)
        except (OSError, SyntaxError, ValueError) as err:
            raise DatasetError(f"cannot read image {path} (corrupt or truncated): {err}") from err
        if image.shape[:2] != (height, width):
            raise DatasetError(
                f"{path} is {image.shape[1]}x{image.shape[0]} but {self.annotation_file.name} "
                f"says {width}x{height}"
            )
        label = _read_label_png(self._label_path(key), (height, width))
        if label is None:  # deleted or damaged cache entry: rasterise again
            label = rasterise_label(self._get_coco(), int(key))
            _write_label_png(self._label_path(key), label)
        return image, label

    # ----------------------------------------------------------------------------------- internals
    def _check_layout(self) -> None:
        if not self.root.is_dir():
            raise DatasetError(f"COCO root {self.root} does not exist. {DOWNLOAD_HINT}")
        if not self.image_dir.is_dir():
            raise DatasetError(
                f"image folder {self.image_dir} is missing (from {self.split}2014.zip). "
                f"{DOWNLOAD_HINT}"
            )
        if not self.annotation_file.is_file():
            raise DatasetError(
                f"annotation file {self.annotation_file} is missing (from "
                f"annotations_trainval2014.zip). {DOWNLOAD_HINT}"
            )

    def _label_path(self, image_id: str) -> Path:
        return self.cache_dir / f"{int(image_id):012d}.png"

    def _cache_key(self) -> dict[str, Any]:
        stat = self.annotation_file.stat()
        return {
            "format": CACHE_FORMAT,
            "annotation_file": self.annotation_file.name,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        }

    def _get_coco(self) -> Any:
        if self._coco is None:
            self._coco = _coco_from_dataset(_read_annotations(self.annotation_file))
        return self._coco

    def _load_or_build_index(self) -> dict[str, Any]:
        """The class index of this split: cached JSON when its key matches the annotation file,
        else rebuilt by rasterising (and caching) every label."""
        key = self._cache_key()
        path = self.cache_dir / INDEX_NAME
        with contextlib.suppress(OSError, json.JSONDecodeError, UnicodeDecodeError):
            with path.open("rb") as f:
                index = json.load(f)
            if isinstance(index, dict) and index.get("key") == key:
                return index
        coco = self._get_coco()
        images: dict[str, list[Any]] = {}
        class_pixels: dict[str, dict[str, int]] = {}
        for image_id in progress_bar(
            sorted(coco.imgs), f"COCO {self.split}2014: rasterising labels", unit="img"
        ):
            info = coco.imgs[image_id]
            images[str(image_id)] = [info["file_name"], int(info["height"]), int(info["width"])]
            label = rasterise_label(coco, image_id)
            _write_label_png(self._label_path(str(image_id)), label)
            counts = np.bincount(label.ravel(), minlength=256)
            for class_id in np.flatnonzero(counts[1 : NUM_COCO_CLASSES + 1]) + 1:
                class_pixels.setdefault(str(class_id), {})[str(image_id)] = int(counts[class_id])
        index = {"key": key, "images": images, "class_pixels": class_pixels}
        atomic_write_bytes(path, json.dumps(index, separators=(",", ":")).encode())
        return index
