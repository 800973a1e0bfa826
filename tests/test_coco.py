"""COCO-20i loader: renumbering, folds, rasterisation, disk cache, filters and clear errors.

Everything runs on a tiny COCO 2014 layout written into tmp_path (40x48 JPEGs, real category ids).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

from mfnet.data import coco as coco_mod  # noqa: E402
from mfnet.data.coco import (  # noqa: E402
    COCO_CATEGORY_IDS,
    CocoImages,
    DatasetError,
    coco_base_classes,
    coco_category_from_class,
    coco_class_from_category,
    coco_class_name,
    coco_novel_classes,
)

# pycocotools' mask.decode trips a numpy 2 deprecation of its own; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 40, 48

# fss_protocols.md section 2, (a) contiguous "PANet split" (= split A), verbatim.
SPLIT_A_NAMES = [
    "person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, fire "
    "hydrant, stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow",
    "elephant, bear, zebra, giraffe, backpack, umbrella, handbag, tie, suitcase, frisbee, skis, "
    "snowboard, sports ball, kite, baseball bat, baseball glove, skateboard, surfboard, tennis "
    "racket, bottle",
    "wine glass, cup, fork, knife, spoon, bowl, banana, apple, sandwich, orange, broccoli, carrot, "
    "hot dog, pizza, donut, cake, chair, couch, potted plant, bed",
    "dining table, toilet, tv, laptop, mouse, remote, keyboard, cell phone, microwave, oven, "
    "toaster, sink, refrigerator, book, clock, vase, scissors, teddy bear, hair drier, toothbrush",
]
# fss_protocols.md section 2, (b) interleaved "FWB split" (= split B), verbatim.
SPLIT_B_NAMES = [
    "person, airplane, boat, parking meter, dog, elephant, backpack, suitcase, sports ball, "
    "skateboard, wine glass, spoon, sandwich, hot dog, chair, dining table, mouse, microwave, "
    "refrigerator, scissors",
    "bicycle, bus, traffic light, bench, horse, bear, umbrella, frisbee, kite, surfboard, cup, "
    "bowl, orange, pizza, couch, toilet, remote, oven, book, teddy bear",
    "car, train, fire hydrant, bird, sheep, zebra, handbag, skis, baseball bat, tennis racket, "
    "fork, banana, broccoli, donut, potted plant, tv, keyboard, toaster, clock, hair drier",
    "motorcycle, truck, stop sign, cat, cow, giraffe, tie, snowboard, baseball glove, bottle, "
    "knife, apple, carrot, cake, bed, laptop, cell phone, sink, vase, toothbrush",
]
# The doc's id ranges of split B: fold0 (1,5,...,77) .. fold3 (4,8,...,80).
SPLIT_B_FIRST_LAST = [(1, 77), (2, 78), (3, 79), (4, 80)]


def _rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _box_mask(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[r0:r1, c0:c1] = 1
    return m


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE by hand: run lengths over the column-major pixel order,
    starting with a (possibly empty) run of zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


def _compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _annotations() -> dict[str, Any]:
    anns = [
        # image 9: a small car listed BEFORE the large person it lies on (file order would hide it)
        {
            "id": 101,
            "image_id": 9,
            "category_id": 3,
            "iscrowd": 0,
            "segmentation": [_rect(10, 10, 20, 20)],
        },
        {
            "id": 102,
            "image_id": 9,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": [_rect(4, 4, 40, 32)],
        },
        {
            "id": 103,
            "image_id": 9,
            "category_id": 1,
            "iscrowd": 1,
            "segmentation": _uncompressed_rle(_box_mask(26, 38, 30, 46)),
        },
        # image 25: a cow as compressed RLE and a 3x3 bottle
        {
            "id": 201,
            "image_id": 25,
            "category_id": 21,
            "iscrowd": 0,
            "segmentation": _compressed_rle(_box_mask(5, 25, 5, 30)),
        },
        {
            "id": 202,
            "image_id": 25,
            "category_id": 44,
            "iscrowd": 0,
            "segmentation": [_rect(35, 30, 38, 33)],
        },
        # image 30: toothbrush, elephant, and a two-part bicycle
        {
            "id": 301,
            "image_id": 30,
            "category_id": 90,
            "iscrowd": 0,
            "segmentation": [_rect(2, 2, 12, 12)],
        },
        {
            "id": 302,
            "image_id": 30,
            "category_id": 22,
            "iscrowd": 0,
            "segmentation": [_rect(20, 20, 44, 36)],
        },
        {
            "id": 303,
            "image_id": 30,
            "category_id": 2,
            "iscrowd": 0,
            "segmentation": [_rect(30, 2, 36, 8), _rect(40, 2, 46, 8)],
        },
        # image 42 (grayscale JPEG): only a crowd of cows
        {
            "id": 401,
            "image_id": 42,
            "category_id": 21,
            "iscrowd": 1,
            "segmentation": _uncompressed_rle(_box_mask(0, 10, 0, 10)),
        },
    ]
    # Categories deliberately out of order: renumbering follows the id, not the file order.
    cats = [
        (90, "toothbrush"),
        (3, "car"),
        (1, "person"),
        (44, "bottle"),
        (21, "cow"),
        (2, "bicycle"),
        (22, "elephant"),
    ]
    return {
        "images": [
            {"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": H, "width": W}
            for i in (9, 25, 30, 42)
        ],
        "annotations": anns,
        "categories": [{"id": c, "name": n, "supercategory": "x"} for c, n in cats],
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data))


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2014").mkdir()
    rng = np.random.default_rng(0)
    for i in (9, 25, 30, 42):
        pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        img = Image.fromarray(pixels).convert("L" if i == 42 else "RGB")
        img.save(root / "train2014" / f"COCO_train2014_{i:012d}.jpg", quality=90)
    _write_json(root / "annotations" / "instances_train2014.json", _annotations())
    return root


def test_renumbering_follows_ascending_category_id() -> None:
    assert len(COCO_CATEGORY_IDS) == 80 and list(COCO_CATEGORY_IDS) == sorted(COCO_CATEGORY_IDS)
    for cat, cls in [
        (1, 1),
        (11, 11),
        (13, 12),
        (21, 20),
        (22, 21),
        (44, 40),
        (46, 41),
        (67, 61),
        (90, 80),
    ]:
        assert coco_class_from_category(cat) == cls
        assert coco_category_from_class(cls) == cat
    assert all(coco_class_from_category(coco_category_from_class(c)) == c for c in range(1, 81))
    assert (coco_class_name(1), coco_class_name(20), coco_class_name(80)) == (
        "person",
        "cow",
        "toothbrush",
    )
    with pytest.raises(DatasetError, match="not one of the 80 COCO"):
        coco_class_from_category(12)


@pytest.mark.parametrize("fold", range(4))
def test_fold_lists_match_fss_protocols(fold: int) -> None:
    novel_a = coco_novel_classes(fold)  # split A is the default
    assert novel_a == tuple(range(20 * fold + 1, 20 * fold + 21))
    assert [coco_class_name(c) for c in novel_a] == SPLIT_A_NAMES[fold].split(", ")
    novel_b = coco_novel_classes(fold, "B")
    assert (novel_b[0], novel_b[-1]) == SPLIT_B_FIRST_LAST[fold] and len(novel_b) == 20
    assert [coco_class_name(c) for c in novel_b] == SPLIT_B_NAMES[fold].split(", ")
    for split, novel in (("A", novel_a), ("B", novel_b)):
        base = coco_base_classes(fold, split)
        assert len(base) == 60 and set(base) | set(novel) == set(range(1, 81))
        assert not set(base) & set(novel) and list(base) == sorted(base)
    # Each split's folds partition the 80 classes.
    for split in "AB":
        assert sorted(c for f in range(4) for c in coco_novel_classes(f, split)) == list(
            range(1, 81)
        )


def test_rasterised_labels(coco_root: Path) -> None:
    ds = CocoImages(coco_root, "train", 0, "test")
    image, label = ds.load("9")
    assert image.dtype == np.uint8 and image.shape == (H, W, 3)
    assert label.dtype == np.uint8 and label.shape == (H, W)
    assert label[25, 25] == 1  # person polygon interior
    assert label[15, 15] == 3  # the small car stays visible on the larger person
    assert label[35, 44] == 255  # crowd pixel outside every non-crowd instance -> ignore
    assert label[28, 34] == 1  # crowd pixel covered by the person instance stays person
    assert label[2, 2] == 0 and label[39, 0] == 0
    assert set(np.unique(label)) == {0, 1, 3, 255}

    _, label = ds.load("25")
    assert label[15, 15] == 20  # COCO category 21 (cow), compressed RLE -> class 20
    assert (label == 20).sum() == 20 * 25  # RLE decoded exactly
    assert label[31, 36] == 40  # bottle (category 44)

    _, label = ds.load("30")
    assert label[6, 6] == 80 and label[28, 30] == 21  # toothbrush (90), elephant (22)
    assert label[5, 33] == 2 and label[5, 43] == 2 and label[5, 38] == 0  # both bicycle parts

    image, label = ds.load(42)  # int ids are accepted too; grayscale JPEG -> RGB
    assert image.shape == (H, W, 3) and (image[..., 0] == image[..., 2]).all()
    assert (label[:10, :10] == 255).all() and (label[10:] == 0).all()


def test_images_with_roles_and_small_object_filter(coco_root: Path) -> None:
    test0 = CocoImages(coco_root, "train", 0, "test")
    assert test0.classes == tuple(range(1, 21))
    assert test0.images_with(1) == ("9",) and test0.images_with(3) == ("9",)
    assert test0.images_with(2) == ("30",)
    assert test0.images_with(20) == ("25",)  # not "42": crowd-only pixels are ignore, not cow
    assert test0.images_with(5) == ()

    train0 = CocoImages(coco_root, "train", 0, "train")
    assert train0.classes == coco_base_classes(0) and not set(train0.classes) & set(range(1, 21))
    assert train0.images_with(21) == ("30",) and train0.images_with(80) == ("30",)
    assert train0.images_with(40) == ("25",)
    with pytest.raises(DatasetError, match="not one of the base classes of COCO-20i fold 0"):
        train0.images_with(1)

    # The 3x3 bottle (9 px) drops out at min_object_pixels=10; the 420-px elephant stays.
    small = CocoImages(coco_root, "train", 1, "test", min_object_pixels=10)
    assert small.images_with(40) == () and small.images_with(21) == ("30",)
    assert CocoImages(coco_root, "train", 1, "test", min_object_pixels=9).images_with(40) == ("25",)

    split_b = CocoImages(coco_root, "train", 0, "test", fold_split="B")
    assert split_b.classes == coco_novel_classes(0, "B") and split_b.images_with(21) == ("30",)
    with pytest.raises(DatasetError, match="novel classes"):
        split_b.images_with(2)


def test_disk_cache_is_used_then_rebuilt_when_the_json_changes(
    coco_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = CocoImages(coco_root, "train", 0, "test")
    cache = coco_root / "mfnet_cache" / "train2014"
    assert first.cache_dir == cache and (cache / "class_index.json").is_file()
    assert sorted(p.name for p in cache.glob("*.png")) == [f"{i:012d}.png" for i in (9, 25, 30, 42)]
    expected = {i: first.load(i)[1] for i in ("9", "25", "30", "42")}

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cache should have been used")

    # Second pass: neither the annotation file nor the rasteriser may be touched.
    monkeypatch.setattr(coco_mod, "rasterise_label", fail)
    monkeypatch.setattr(coco_mod, "_read_annotations", fail)
    second = CocoImages(coco_root, "train", 0, "test")
    assert second.images_with(1) == ("9",)
    for i, label in expected.items():
        np.testing.assert_array_equal(second.load(i)[1], label)
    monkeypatch.undo()

    # A lost label PNG is rasterised again on demand.
    (cache / f"{9:012d}.png").unlink()
    np.testing.assert_array_equal(
        CocoImages(coco_root, "train", 0, "test").load("9")[1], expected["9"]
    )

    # A changed annotation file (size and mtime) rebuilds labels and lists.
    data = _annotations()
    data["annotations"][0]["category_id"] = 5  # the car becomes an airplane
    ann_file = coco_root / "annotations" / "instances_train2014.json"
    _write_json(ann_file, data)
    os.utime(ann_file, ns=(10**18, 10**18))
    calls: list[int] = []
    real = coco_mod.rasterise_label
    monkeypatch.setattr(coco_mod, "rasterise_label", lambda c, i: calls.append(i) or real(c, i))
    third = CocoImages(coco_root, "train", 0, "test")
    assert sorted(calls) == [9, 25, 30, 42]
    assert third.images_with(3) == () and third.images_with(5) == ("9",)
    assert third.load("9")[1][15, 15] == 5


def test_custom_cache_dir_and_no_pycocotools_needed_once_cached(
    coco_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = {"pycocotools": None, "pycocotools.coco": None, "pycocotools.mask": None}
    with monkeypatch.context() as m:
        for name, module in blocked.items():
            m.setitem(sys.modules, name, module)
        with pytest.raises(DatasetError, match="pip install pycocotools"):
            CocoImages(coco_root, "train", 0, "test", cache_dir=str(tmp_path / "c"))
    CocoImages(coco_root, "train", 0, "test", cache_dir=str(tmp_path / "c"))
    assert (tmp_path / "c" / "class_index.json").is_file()
    assert not (coco_root / "mfnet_cache").exists()
    with monkeypatch.context() as m:
        for name, module in blocked.items():
            m.setitem(sys.modules, name, module)
        ds = CocoImages(coco_root, "train", 0, "test", cache_dir=str(tmp_path / "c"))
        assert ds.load("9")[1][15, 15] == 3


def test_layout_errors_name_the_missing_file(coco_root: Path, tmp_path: Path) -> None:
    with pytest.raises(
        DatasetError,
        match=r"does not exist.*train2014\.zip, val2014\.zip and "
        r"annotations_trainval2014\.zip from cocodataset\.org",
    ):
        CocoImages(tmp_path / "nowhere", "train", 0, "test")
    with pytest.raises(DatasetError, match=r"val2014 is missing.*cocodataset\.org"):
        CocoImages(coco_root, "val", 0, "test")
    (coco_root / "val2014").mkdir()
    with pytest.raises(DatasetError, match=r"instances_val2014\.json is missing.*cocodataset"):
        CocoImages(coco_root, "val", 0, "test")
    (coco_root / "annotations" / "instances_val2014.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"instances_val2014\.json is not valid JSON"):
        CocoImages(coco_root, "val", 0, "test")
    _write_json(coco_root / "annotations" / "instances_val2014.json", {"images": []})
    with pytest.raises(DatasetError, match="not a COCO instances file"):
        CocoImages(coco_root, "val", 0, "test")


def test_image_errors_name_the_file(coco_root: Path) -> None:
    ds = CocoImages(coco_root, "train", 0, "test")
    (coco_root / "train2014" / f"COCO_train2014_{25:012d}.jpg").unlink()
    with pytest.raises(
        DatasetError,
        match=r"image 25 is listed in instances_train2014\.json "
        r"but .*/COCO_train2014_000000000025\.jpg is missing.*cocodataset\.org",
    ):
        ds.load("25")
    (coco_root / "train2014" / f"COCO_train2014_{30:012d}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DatasetError, match=r"cannot read image .*COCO_train2014_000000000030\.jpg"):
        ds.load("30")
    with pytest.raises(DatasetError, match=r"image id '7' is not in .*instances_train2014\.json"):
        ds.load("7")


def test_argument_errors(coco_root: Path) -> None:
    ds = CocoImages(coco_root, "train", 0, "test")
    for bad in (0, 81, -1):
        with pytest.raises(DatasetError, match=r"class ids are 1\.\.80"):
            ds.images_with(bad)
        with pytest.raises(DatasetError, match=r"class ids are 1\.\.80"):
            coco_class_name(bad)
    for bad_fold in (4, -1):
        with pytest.raises(DatasetError, match=r"fold must be an int in 0\.\.3"):
            coco_novel_classes(bad_fold)
        with pytest.raises(DatasetError, match=r"fold must be an int in 0\.\.3"):
            CocoImages(coco_root, "train", bad_fold, "test")
    with pytest.raises(DatasetError, match="unknown COCO-20i fold split 'C'"):
        coco_base_classes(0, "C")
    with pytest.raises(DatasetError, match="unknown COCO-20i fold split 'b'"):
        CocoImages(coco_root, "train", 0, "test", fold_split="b")
    with pytest.raises(DatasetError, match="COCO split must be one of"):
        CocoImages(coco_root, "test", 0, "test")
    with pytest.raises(DatasetError, match="role must be one of"):
        CocoImages(coco_root, "train", 0, "val")
    with pytest.raises(DatasetError, match="min_object_pixels"):
        CocoImages(coco_root, "train", 0, "test", min_object_pixels=-1)
    # Argument errors are also ValueErrors (DatasetArgumentError), like the PASCAL-5i collection.
    with pytest.raises(ValueError):
        coco_novel_classes(0, "C")
    with pytest.raises(ValueError):
        ds.images_with(81)


def test_foreign_category_is_rejected(coco_root: Path) -> None:
    data = _annotations()
    data["categories"].append({"id": 12, "name": "street sign"})
    _write_json(coco_root / "annotations" / "instances_train2014.json", data)
    with pytest.raises(DatasetError, match=r"category 12 \('street sign'\) is not a COCO 2014"):
        CocoImages(coco_root, "train", 0, "test")
    data = _annotations()
    data["annotations"][0]["category_id"] = 12
    _write_json(coco_root / "annotations" / "instances_train2014.json", data)
    with pytest.raises(DatasetError, match=r"annotation 101 of image 9 has category_id 12"):
        CocoImages(coco_root, "train", 0, "test")


def test_image_size_must_match_the_annotation(coco_root: Path) -> None:
    data = _annotations()
    data["images"][0]["height"] = H + 2
    for ann in data["annotations"][:3]:  # keep the RLE sizes consistent with the new height
        if isinstance(ann["segmentation"], dict):
            ann["segmentation"] = [_rect(30, 26, 46, 38)]
    _write_json(coco_root / "annotations" / "instances_train2014.json", data)
    ds = CocoImages(coco_root, "train", 0, "test")
    with pytest.raises(
        DatasetError,
        match=r"COCO_train2014_000000000009\.jpg is 48x40 but "
        r"instances_train2014\.json says 48x42",
    ):
        ds.load("9")
