"""Support-set specification: which images and masks show which class (no torch).

One format, read by both ``python -m mfnet_runtime segment --support SPEC`` and
``python -m mfnet.predict --support SPEC`` (the exact rules are in ``docs/support_spec.md``):

- a folder ``SPEC/<class name>/`` per class, holding images ``x.jpg`` and, beside each, its mask
  ``x.mask.png``; classes in sorted folder-name order unless ``SPEC/classes.txt`` lists them
  (one per line: that order, and only those classes);
- or a JSON file ``{"classes": [{"name": "cat", "shots": [{"image": "a.jpg", "mask":
  "a_mask.png"}, ...]}, ...]}`` with paths relative to the JSON file.

Masks are single-channel 8-bit images. Their values decide what is the class:
{0, 1}: 1 = class; {0, 255}: 255 = class; {0, 1, 255}: 1 = class, 255 = ignore (the training
label convention). Any other value is an error (anti-aliased or JPEG-compressed masks). Files
are read by ``images.read_image_file`` / ``images.as_mask_array``, the runtime's one definition
of these conventions; this module adds the layout, the class order and errors naming the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RuntimeInputError
from .images import as_mask_array, read_image_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIX = ".mask.png"
CLASSES_FILE = "classes.txt"


class SupportSpecError(RuntimeInputError):
    """The support specification is malformed; the message names the offending file."""


@dataclass(frozen=True)
class ShotSpec:
    """One support example: an image file and the file of its mask."""

    image: Path
    mask: Path


@dataclass(frozen=True)
class ClassSpec:
    """One class of the support set, in the order the segmenter will number it (1, 2, ...)."""

    name: str
    shots: tuple[ShotSpec, ...]


def is_image_file(path: Path) -> bool:
    """An image by its extension (case-insensitive), not hidden, and not a ``.mask.png``."""
    name = path.name.lower()
    return (
        path.is_file()
        and not name.startswith(".")
        and name.endswith(IMAGE_EXTENSIONS)
        and not name.endswith(MASK_SUFFIX)
    )


def read_support_spec(path: str | Path) -> list[ClassSpec]:
    """Parse a SPEC folder or JSON file into classes and file paths (checks that files exist).

    Raises ``SupportSpecError`` for a missing path, a class without images, an image without
    its mask, no classes, duplicate class names, or a malformed ``classes.txt`` / JSON file.
    """
    root = Path(path)
    if not root.exists():
        raise SupportSpecError(f"support spec {root} does not exist")
    if root.is_dir():
        classes = _read_folder(root)
    elif root.suffix.lower() == ".json":
        classes = _read_json(root)
    else:
        raise SupportSpecError(
            f"support spec {root} is neither a folder (one sub-folder per class) nor a .json file"
        )
    if not classes:
        raise SupportSpecError(f"support spec {root} defines no classes")
    for spec in classes:
        for shot in spec.shots:
            for file in (shot.image, shot.mask):
                if file.is_dir():
                    raise SupportSpecError(
                        f"class {spec.name!r}: {file} is a directory, expected an image file"
                    )
                if not file.is_file():
                    raise SupportSpecError(f"class {spec.name!r}: file {file} does not exist")
    return classes


def _read_folder(root: Path) -> list[ClassSpec]:
    folders = {p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    order_file = root / CLASSES_FILE
    if order_file.is_file():
        names = [line.strip() for line in order_file.read_text(encoding="utf-8").splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
        _check_unique(names, order_file)
        missing = [n for n in names if n not in folders]
        if missing:
            raise SupportSpecError(
                f"{order_file} lists {missing} but {root} has no such folder(s); "
                f"folders: {sorted(folders)}"
            )
    else:
        names = sorted(folders)
    classes = []
    for name in names:
        images = sorted(p for p in folders[name].iterdir() if is_image_file(p))
        if not images:
            raise SupportSpecError(
                f"class {name!r}: folder {folders[name]} holds no image "
                f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        shots = []
        for image in images:
            mask = image.with_name(image.stem + MASK_SUFFIX)
            if not mask.is_file():
                raise SupportSpecError(
                    f"class {name!r}: image {image} has no mask {mask.name} beside it"
                )
            shots.append(ShotSpec(image, mask))
        classes.append(ClassSpec(name, tuple(shots)))
    return classes


def _read_json(file: Path) -> list[ClassSpec]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SupportSpecError(f"support spec {file} is not readable JSON: {error}") from error
    entries = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise SupportSpecError(f'support spec {file} needs a top-level "classes" list')
    base = file.parent
    classes = []
    for i, entry in enumerate(entries):
        where = f"{file}: classes[{i}]"
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("name"), str)
            or not entry["name"].strip()
        ):
            raise SupportSpecError(f'{where} needs a non-empty "name" string')
        name = entry["name"].strip()
        raw_shots = entry.get("shots")
        if not isinstance(raw_shots, list) or not raw_shots:
            raise SupportSpecError(f'{where} ({name!r}) needs a non-empty "shots" list')
        shots = []
        for j, shot in enumerate(raw_shots):
            if not isinstance(shot, dict) or not all(
                isinstance(shot.get(key), str) for key in ("image", "mask")
            ):
                raise SupportSpecError(
                    f'{where}.shots[{j}] ({name!r}) needs "image" and "mask" path strings'
                )
            shots.append(ShotSpec(base / shot["image"], base / shot["mask"]))
        classes.append(ClassSpec(name, tuple(shots)))
    _check_unique([c.name for c in classes], file)
    return classes


def _check_unique(names: list[str], where: Path) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise SupportSpecError(f"{where} lists class {name!r} twice")
        seen.add(name)


def _read_shot(name: str, shot: ShotSpec) -> tuple[np.ndarray, np.ndarray]:
    """One shot's files -> (image uint8 [H, W, 3] RGB, mask uint8 [H, W] 1/0/255).

    The images module reads both (one definition of the image and mask conventions); its
    errors are re-raised as ``SupportSpecError`` naming the class and the file.
    """
    try:
        image = read_image_file(shot.image, "image")
    except RuntimeInputError as error:
        raise SupportSpecError(f"class {name!r}: {error}") from error
    try:
        mask = as_mask_array(shot.mask, "mask")
    except RuntimeInputError as error:
        where = "" if str(shot.mask) in str(error) else f", file {shot.mask}"
        raise SupportSpecError(f"class {name!r}{where}: {error}") from error
    if mask.shape != image.shape[:2]:
        raise SupportSpecError(
            f"class {name!r}: mask {shot.mask} is {mask.shape[1]}x{mask.shape[0]} but image "
            f"{shot.image} is {image.shape[1]}x{image.shape[0]} (width x height)"
        )
    if not (mask == 1).any():
        raise SupportSpecError(
            f"class {name!r}: mask {shot.mask} marks no pixel of its class (it is all 0)"
        )
    return image, mask


def load_support_spec(path: str | Path) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Read a SPEC folder or JSON file into ``{class name: [(image, mask), ...]}``.

    The dict's order is the class order (class i gets label i, 1-based). Images are uint8
    [H, W, 3] RGB; masks uint8 [H, W] of the same H, W with 1 = class, 0 = not, 255 = ignore.
    Raises ``SupportSpecError`` (a ``RuntimeInputError``) naming the file at fault.
    """
    return {
        spec.name: [_read_shot(spec.name, shot) for shot in spec.shots]
        for spec in read_support_spec(path)
    }
