"""Prepare PASCAL-5i from the raw VOC2012 and SBD releases.

    python -m mfnet.data.prepare_pascal --voc-root VOCdevkit/VOC2012 --sbd-root benchmark_RELEASE

Steps, each restartable (files are written to a temporary name and renamed, finished files are
skipped, so an interrupted run is simply run again):

1. ``SegmentationClassAug/<id>.png``: index PNGs (mode "L", 0..20, 255) for every image of
   trainaug and val. VOC's own ``SegmentationClass`` annotation is used where it exists (palette
   PNGs read as palette indices; 255 marks boundaries); SBD's ``cls/<id>.mat`` (field
   ``GTcls.Segmentation``, no boundary band) fills in the rest. Existing PNGs are kept, so a
   downloaded SegmentationClassAug works too.
2. ``ImageSets/SegmentationAug/trainaug.txt`` = (SBD train + SBD val + VOC train) - VOC val
   (10,582 ids with the full releases) and ``val.txt`` = VOC val (1,449 ids).
3. ``mfnet_lists/{trainaug,val}.json``: per-class image lists with pixel counts (see
   ``mfnet.data.pascal.load_class_index``).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mfnet.data.pascal import (
    DOWNLOAD_SOURCES,
    IGNORE_INDEX,
    IMAGE_DIR,
    LABEL_DIR,
    NUM_CLASSES,
    SPLITS,
    DatasetError,
    atomic_write_bytes,
    check_label_values,
    load_class_index,
    read_id_list,
    split_list_path,
    voc_palette,
)
from mfnet.progress import progress_bar
from mfnet_runtime.console import configure_logging

VOC_LABEL_DIR = "SegmentationClass"
VOC_LIST_DIR = Path("ImageSets") / "Segmentation"
STANDARD_SIZES = {"trainaug": 10582, "val": 1449}  # with the complete VOC2012 + SBD releases
_REEXTRACT = "re-extract SegmentationClass from the VOC2012 trainval tar (PASCAL VOC site)"
_ALLOWED = np.array([*range(NUM_CLASSES + 1), IGNORE_INDEX])


@dataclass(frozen=True)
class PrepareReport:
    """What one preparation run did: labels converted from VOC and from SBD, labels already
    present (skipped), and the sizes of the written image lists."""

    from_voc: int
    from_sbd: int
    skipped: int
    list_sizes: dict[str, int]


def resolve_sbd_root(sbd_root: str | Path) -> Path:
    """The SBD ``dataset`` folder (holding ``cls/``, ``train.txt``, ``val.txt``), given either
    ``benchmark_RELEASE`` or ``benchmark_RELEASE/dataset``."""
    root = Path(sbd_root)
    for candidate in (root / "dataset", root):
        if (candidate / "cls").is_dir():
            missing = [n for n in ("train.txt", "val.txt") if not (candidate / n).is_file()]
            if missing:
                raise DatasetError(
                    f"SBD folder {candidate} lacks {', '.join(missing)}; re-extract benchmark.tgz "
                    "from the Berkeley SBD page"
                )
            return candidate
    raise DatasetError(
        f"SBD folder {root} has no cls/ (looked in {root / 'dataset'} and {root}). Pass the "
        "benchmark_RELEASE folder extracted from benchmark.tgz (Berkeley SBD page)."
    )


def voc_ids(voc_root: Path, split: str) -> list[str]:
    """Ids of VOC's own ``ImageSets/Segmentation/<split>.txt`` ("train" or "val")."""
    path = voc_root / VOC_LIST_DIR / f"{split}.txt"
    if not path.is_file():
        raise DatasetError(
            f"{path} not found: {voc_root} must be the VOCdevkit/VOC2012 folder of the VOC2012 "
            "trainval tar (VOCtrainval_11-May-2012.tar) from the PASCAL VOC site"
        )
    return read_id_list(path)


def split_ids(voc_root: Path, sbd_dataset: Path | None) -> dict[str, list[str]]:
    """The trainaug and val image ids.

    trainaug = (VOC train + SBD train + SBD val) - VOC val, sorted. Without SBD, the SBD part is
    replaced by the labels already in SegmentationClassAug (e.g. a downloaded copy), so a rerun
    without ``--sbd-root`` keeps the full list.
    """
    val = voc_ids(voc_root, "val")
    pool = set(voc_ids(voc_root, "train"))
    if sbd_dataset is not None:
        pool.update(read_id_list(sbd_dataset / "train.txt"))
        pool.update(read_id_list(sbd_dataset / "val.txt"))
    elif (voc_root / LABEL_DIR).is_dir():
        pool.update(p.stem for p in (voc_root / LABEL_DIR).glob("*.png"))
    return {"trainaug": sorted(pool.difference(val)), "val": val}


def _rgb_to_index(rgb: np.ndarray, path: Path) -> np.ndarray:
    """Colour-coded VOC label uint8 [H, W, 3] -> index label uint8 [H, W] via the VOC palette."""
    palette = voc_palette()[_ALLOWED].astype(np.int64)
    keys = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    colours, inverse = np.unique(codes, return_inverse=True)
    known = np.isin(colours, keys)
    if not known.all():
        shown = ", ".join(f"({c >> 16},{(c >> 8) & 255},{c & 255})" for c in colours[~known][:5])
        raise DatasetError(f"label {path} has colours outside the VOC palette: {shown}")
    order = np.argsort(keys)
    values = _ALLOWED[order][np.searchsorted(keys[order], colours)]
    return values[inverse].reshape(codes.shape).astype(np.uint8)


def read_voc_label(path: Path) -> np.ndarray:
    """A VOC SegmentationClass PNG -> uint8 [H, W], values 0..20 and 255.

    Palette ("P") PNGs, as shipped, are read as their palette indices (their RGB rendering would
    be colours, not class ids); RGB PNGs are mapped back through the VOC palette.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("P", "L"):
                label = np.asarray(image).astype(np.uint8, copy=False)
            elif image.mode in ("RGB", "RGBA"):
                label = _rgb_to_index(np.asarray(image.convert("RGB")), path)
            else:
                raise DatasetError(f"label {path} has unsupported image mode {image.mode!r}")
    except (OSError, ValueError, SyntaxError) as exc:
        message = f"VOC label {path} is not a readable PNG ({exc}); {_REEXTRACT}"
        raise DatasetError(message) from exc
    return check_label_values(label, path, advice=_REEXTRACT)


def read_sbd_label(path: Path) -> np.ndarray:
    """An SBD ``cls/<id>.mat`` (struct ``GTcls``, field ``Segmentation``) -> uint8 [H, W],
    values 0..20 (SBD has no 255 boundary band)."""
    from mfnet_runtime.errors import require  # scipy is needed only here, for SBD's .mat files

    loadmat = require(
        "scipy.io", "reading SBD's MATLAB label files", "pip install 'mfnet[data]'"
    ).loadmat

    try:
        segmentation = np.asarray(loadmat(str(path))["GTcls"]["Segmentation"][0, 0])
    except Exception as exc:  # scipy raises many types for damaged files; all mean "corrupt"
        raise DatasetError(
            f"SBD label {path} is not a readable SBD .mat with GTcls.Segmentation "
            f"({type(exc).__name__}: {exc}); re-extract benchmark.tgz from the Berkeley SBD page"
        ) from exc
    if segmentation.ndim != 2 or segmentation.dtype.kind not in "uif":
        raise DatasetError(
            f"SBD label {path}: GTcls.Segmentation is {segmentation.dtype} with shape "
            f"{segmentation.shape}, expected a 2-D integer array"
        )
    values = np.unique(segmentation)
    bad = values[~np.isin(values, _ALLOWED)]
    if bad.size:
        raise DatasetError(
            f"SBD label {path} holds values outside 0..{NUM_CLASSES}: "
            + ", ".join(str(v) for v in bad[:10])
        )
    return segmentation.astype(np.uint8)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of a JPEG, read from its header only."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError as exc:
        raise DatasetError(f"image {path} not found; it comes from {DOWNLOAD_SOURCES}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"image {path} is not a readable image ({exc}); re-extract it") from exc


def convert_labels(
    voc_root: Path, image_ids: Sequence[str], sbd_dataset: Path | None, *, progress: bool = True
) -> tuple[int, int, int]:
    """Write ``SegmentationClassAug/<id>.png`` for each id that lacks one (VOC annotation first,
    then SBD). Returns (converted from VOC, converted from SBD, skipped as already present)."""
    out_dir = voc_root / LABEL_DIR
    out_dir.mkdir(exist_ok=True)
    for leftover in out_dir.glob(".*.tmp"):  # temporary files of an interrupted run
        leftover.unlink(missing_ok=True)
    from_voc = from_sbd = skipped = 0
    for image_id in progress_bar(image_ids, "SegmentationClassAug", enabled=progress):
        out = out_dir / f"{image_id}.png"
        if out.is_file():
            skipped += 1
            continue
        voc_png = voc_root / VOC_LABEL_DIR / f"{image_id}.png"
        sbd_mat = sbd_dataset / "cls" / f"{image_id}.mat" if sbd_dataset is not None else None
        if voc_png.is_file():  # VOC's annotation wins: it is finer and marks boundaries
            label, from_voc = read_voc_label(voc_png), from_voc + 1
        elif sbd_mat is not None and sbd_mat.is_file():
            label, from_sbd = read_sbd_label(sbd_mat), from_sbd + 1
        else:
            raise DatasetError(
                f"no annotation for image {image_id}: neither {voc_png} nor "
                f"{sbd_mat or 'an SBD cls/<id>.mat (pass --sbd-root)'} exists"
            )
        width, height = _image_size(voc_root / IMAGE_DIR / f"{image_id}.jpg")
        if label.shape != (height, width):
            raise DatasetError(
                f"label of {image_id} is {label.shape[1]}x{label.shape[0]} but its image is "
                f"{width}x{height}"
            )
        buffer = io.BytesIO()
        Image.fromarray(label).save(buffer, format="PNG")
        atomic_write_bytes(out, buffer.getvalue())
    return from_voc, from_sbd, skipped


def write_id_list(path: Path, image_ids: Sequence[str]) -> None:
    """Write one id a line; an identical file is left untouched so its mtime (part of the
    class-list cache signature) only changes when its content does."""
    data = "".join(f"{i}\n" for i in image_ids).encode("utf-8")
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write_bytes(path, data)


def prepare(
    voc_root: str | Path,
    sbd_root: str | Path | None = None,
    *,
    progress: bool = True,
    rebuild_lists: bool = False,
) -> PrepareReport:
    """Run all preparation steps (see the module docstring); returns what was done."""
    root = Path(voc_root)
    if not (root / IMAGE_DIR).is_dir():
        raise DatasetError(
            f"{root / IMAGE_DIR} not found: --voc-root must be the VOCdevkit/VOC2012 folder "
            f"extracted from {DOWNLOAD_SOURCES}"
        )
    sbd_dataset = resolve_sbd_root(sbd_root) if sbd_root is not None else None
    ids = split_ids(root, sbd_dataset)
    wanted = list(dict.fromkeys(ids["val"] + ids["trainaug"]))
    missing = [i for i in wanted if not (root / IMAGE_DIR / f"{i}.jpg").is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} listed images have no JPEG in {root / IMAGE_DIR} (first: "
            f"{', '.join(missing[:5])}); use JPEGImages of the VOC2012 trainval tar, which "
            "holds every SBD image"
        )
    from_voc, from_sbd, skipped = convert_labels(root, wanted, sbd_dataset, progress=progress)
    for split in SPLITS:
        write_id_list(split_list_path(root, split), ids[split])
        load_class_index(root, split, rebuild=rebuild_lists, progress=progress)
    return PrepareReport(from_voc, from_sbd, skipped, {s: len(ids[s]) for s in SPLITS})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mfnet.data.prepare_pascal",
        description=(
            "Build PASCAL-5i data under VOCdevkit/VOC2012: SegmentationClassAug index PNGs "
            "(VOC + SBD), the trainaug/val image lists, and cached per-class image lists. "
            "Safe to interrupt and re-run: finished files are skipped."
        ),
        epilog=(
            "Downloads: VOCtrainval_11-May-2012.tar (PASCAL VOC site) and benchmark.tgz "
            "(Berkeley SBD page). See docs/pascal.md."
        ),
    )
    parser.add_argument(
        "--voc-root", required=True, type=Path,
        help="the VOCdevkit/VOC2012 folder (JPEGImages/, SegmentationClass/, ImageSets/)",
    )  # fmt: skip
    parser.add_argument(
        "--sbd-root", type=Path, default=None,
        help="the SBD benchmark_RELEASE folder (or its dataset/ subfolder); without it, "
        "trainaug is VOC train plus any labels already in SegmentationClassAug",
    )  # fmt: skip
    parser.add_argument(
        "--rebuild-lists", action="store_true",
        help="rebuild the per-class list caches (mfnet_lists/) even if they look up to date",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status (0 ok, 1 data error)."""
    args = build_parser().parse_args(argv)
    configure_logging()  # the library's warnings (a class-list cache it cannot write)
    try:
        report = prepare(
            args.voc_root, args.sbd_root, progress=not args.quiet, rebuild_lists=args.rebuild_lists
        )
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"SegmentationClassAug: {report.from_voc} from VOC, {report.from_sbd} from SBD, "
        f"{report.skipped} already present"
    )
    for split, size in report.list_sizes.items():
        standard = STANDARD_SIZES[split]
        note = "" if size == standard else f" (the complete releases give {standard})"
        print(f"{split}: {size} images{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
