"""PASCAL-5i preparation and dataset on a tiny fake VOC2012 + SBD in the real on-disk layout."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

from mfnet.data.pascal import (
    DatasetError,
    PascalImages,
    base_classes,
    cache_path,
    load_class_index,
    novel_classes,
    voc_palette,
)
from mfnet.data.prepare_pascal import main, prepare
from mfnet_runtime.console import configure_logging

H, W = 48, 64  # 3072 pixels per image


def rect_label(rects: list[tuple[int, int, int, int, int]], boundary: bool) -> np.ndarray:
    """uint8 [H, W]: each (class, r0, r1, c0, c1) box painted in turn; ``boundary`` draws VOC's
    1-pixel 255 band around every box."""
    label = np.zeros((H, W), np.uint8)
    for cls, r0, r1, c0, c1 in rects:
        label[r0:r1, c0:c1] = cls
        if boundary:
            label[r0, c0:c1] = label[r1 - 1, c0:c1] = 255
            label[r0:r1, c0] = label[r0:r1, c1 - 1] = 255
    return label


def write_palette_png(path: Path, label: np.ndarray) -> None:
    image = Image.fromarray(label)
    image.putpalette(voc_palette().ravel().tolist())  # "L" + palette -> mode "P", as VOC ships
    image.save(path)


def write_sbd_mat(path: Path, segmentation: np.ndarray) -> None:
    """SBD's structure: struct GTcls with Segmentation, Boundaries (20 sparse cells) and
    CategoriesPresent."""
    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = scipy.sparse.csc_matrix(segmentation.shape, dtype=np.float64)
    present = np.unique(segmentation)
    gtcls = {
        "Segmentation": segmentation,
        "Boundaries": boundaries,
        "CategoriesPresent": present[present > 0].astype(np.uint8).reshape(-1, 1),
    }
    scipy.io.savemat(path, {"GTcls": gtcls})


VOC_LABELS = {  # VOC SegmentationClass annotations (with 255 boundaries)
    "2007_000032": [(1, 2, 46, 2, 62)],  # aeroplane, ~2552 px
    "2007_000039": [(15, 0, 30, 0, 30), (2, 30, 48, 40, 64)],  # person + bicycle
    "2007_000123": [(1, 5, 15, 5, 15), (7, 20, 48, 20, 64)],  # VOC val: aeroplane + car
    "2007_000129": [(12, 10, 40, 10, 50)],  # VOC val: dog
}
SBD_LABELS = {  # SBD cls/*.mat (no boundary band)
    "2007_000039": [(8, 0, 48, 0, 64)],  # also in VOC train: VOC must win (no cat after prep)
    "2008_000002": [(6, 0, 40, 0, 50), (1, 40, 48, 54, 64)],  # bus + small aeroplane (80 px)
    "2008_000003": [(17, 0, 48, 0, 45), (5, 0, 10, 50, 60)],  # sheep + novel-fold-0 bottle
    "2008_000008": [(13, 4, 44, 4, 60)],  # horse
    "2007_000123": [(3, 0, 48, 0, 64)],  # SBD val image that is VOC val: excluded from trainaug
}
TRAINAUG = ["2007_000032", "2007_000039", "2008_000002", "2008_000003", "2008_000008"]
VAL = ["2007_000129", "2007_000123"]  # deliberately unsorted: val keeps VOC's order


@dataclass
class Fake:
    voc: Path
    sbd: Path
    expected: dict[str, np.ndarray]  # id -> the SegmentationClassAug label it must get


def _write_list(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    rng = np.random.default_rng(0)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    sbd = tmp_path / "benchmark_RELEASE"
    for folder in (voc / "JPEGImages", voc / "SegmentationClass", sbd / "dataset" / "cls"):
        folder.mkdir(parents=True)
    expected = {}
    for image_id, rects in SBD_LABELS.items():
        write_sbd_mat(sbd / "dataset" / "cls" / f"{image_id}.mat", rect_label(rects, False))
        expected[image_id] = rect_label(rects, False)
    for image_id, rects in VOC_LABELS.items():
        write_palette_png(voc / "SegmentationClass" / f"{image_id}.png", rect_label(rects, True))
        expected[image_id] = rect_label(rects, True)
    for image_id in expected:
        pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=90)
    _write_list(voc / "ImageSets" / "Segmentation" / "train.txt", ["2007_000032", "2007_000039"])
    _write_list(voc / "ImageSets" / "Segmentation" / "val.txt", VAL)
    _write_list(sbd / "dataset" / "train.txt", ["2007_000039", "2008_000002", "2008_000003"])
    _write_list(sbd / "dataset" / "val.txt", ["2008_000008", "2007_000123"])
    return Fake(voc, sbd, expected)


@pytest.fixture
def prepared(fake: Fake) -> Fake:
    prepare(fake.voc, fake.sbd, progress=False)
    return fake


def _counts(label: np.ndarray) -> dict[int, int]:
    return {int(c): int((label == c).sum()) for c in np.unique(label) if 1 <= c <= 20}


def test_voc_palette_is_the_standard_colour_map() -> None:
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[1].tolist() == [128, 0, 0] and palette[15].tolist() == [192, 128, 128]
    assert palette[255].tolist() == [224, 224, 192]


def test_prepared_labels_are_palette_indices_with_voc_precedence(prepared: Fake) -> None:
    voc_png = prepared.voc / "SegmentationClass" / "2007_000032.png"
    with Image.open(voc_png) as shipped:  # the fake is realistic: colours differ from indices
        assert shipped.mode == "P"
        assert shipped.convert("RGB").getpixel((30, 20)) == (128, 0, 0)
    for image_id, expected in prepared.expected.items():
        with Image.open(prepared.voc / "SegmentationClassAug" / f"{image_id}.png") as image:
            assert image.mode == "L"
            np.testing.assert_array_equal(np.asarray(image), expected, err_msg=image_id)
    # VOC wins where both exist: the SBD "cat" of 2007_000039 never reaches the output.
    np.testing.assert_array_equal(
        prepared.expected["2007_000039"], rect_label(VOC_LABELS["2007_000039"], True)
    )
    # SBD-only labels carry no boundary band, VOC ones do.
    assert 255 not in prepared.expected["2008_000002"] and 255 in prepared.expected["2007_000032"]


def test_rgb_voc_labels_are_mapped_back_through_the_palette(fake: Fake) -> None:
    label = rect_label(VOC_LABELS["2007_000039"], True)
    Image.fromarray(voc_palette()[label]).save(fake.voc / "SegmentationClass" / "2007_000039.png")
    prepare(fake.voc, fake.sbd, progress=False)
    out = np.asarray(Image.open(fake.voc / "SegmentationClassAug" / "2007_000039.png"))
    np.testing.assert_array_equal(out, label)


def test_split_lists(prepared: Fake) -> None:
    lists = prepared.voc / "ImageSets" / "SegmentationAug"
    assert (lists / "trainaug.txt").read_text().split() == TRAINAUG
    assert (lists / "val.txt").read_text().split() == VAL
    # Without --sbd-root the labels already built keep trainaug complete.
    report = prepare(prepared.voc, None, progress=False)
    assert report.list_sizes == {"trainaug": len(TRAINAUG), "val": len(VAL)}
    assert (lists / "trainaug.txt").read_text().split() == TRAINAUG


def test_voc_only_preparation_gives_voc_train(fake: Fake) -> None:
    report = prepare(fake.voc, None, progress=False)
    assert (report.from_voc, report.from_sbd) == (4, 0)
    assert load_class_index(fake.voc, "trainaug").image_ids == ("2007_000032", "2007_000039")


def test_per_class_lists_and_pixel_counts(prepared: Fake) -> None:
    for split, ids in (("trainaug", TRAINAUG), ("val", VAL)):
        index = load_class_index(prepared.voc, split, progress=False)
        assert index.image_ids == tuple(ids)
        expected: dict[int, dict[str, int]] = {c: {} for c in range(1, 21)}
        for image_id in ids:
            for c, n in _counts(prepared.expected[image_id]).items():
                expected[c][image_id] = n
        assert {c: dict(v) for c, v in index.pixels.items()} == expected
    index = load_class_index(prepared.voc, "trainaug")
    assert index.pixels[1] == {"2007_000032": 42 * 58, "2008_000002": 80}
    assert 8 not in {c for c, v in index.pixels.items() if "2007_000039" in v}


def test_folds_and_roles(prepared: Fake) -> None:
    assert novel_classes(2) == (11, 12, 13, 14, 15) and len(base_classes(2)) == 15
    for fold in range(4):
        train = PascalImages(prepared.voc, "trainaug", fold, "train")
        test = PascalImages(prepared.voc, "val", fold, "test")
        assert set(train.classes).isdisjoint(novel_classes(fold))
        assert train.classes == base_classes(fold) and test.classes == novel_classes(fold)
        for c in novel_classes(fold):
            with pytest.raises(DatasetError, match="novel class"):
                train.images_with(c)
        for c in train.classes:
            assert all(c in _counts(prepared.expected[i]) for i in train.images_with(c))
    test = PascalImages(prepared.voc, "val", 0, "test")
    assert test.images_with(1) == ("2007_000123",) and test.images_with(3) == ()


def test_drop_novel_images(prepared: Fake) -> None:
    keep = PascalImages(prepared.voc, "trainaug", 0, "train")
    drop = PascalImages(prepared.voc, "trainaug", 0, "train", drop_novel_images=True)
    assert keep.images_with(15) == ("2007_000039",) and keep.images_with(6) == ("2008_000002",)
    assert keep.images_with(17) == ("2008_000003",)  # sheep shares its image with a bottle
    assert drop.images_with(15) == drop.images_with(6) == drop.images_with(17) == ()
    assert drop.images_with(13) == keep.images_with(13) == ("2008_000008",)
    for c in drop.classes:
        for image_id in drop.images_with(c):
            _, label = drop.load(image_id)
            assert not np.isin(label, novel_classes(0)).any()
    with pytest.raises(ValueError, match="train"):
        PascalImages(prepared.voc, "val", 0, "test", drop_novel_images=True)


def test_small_object_filter(prepared: Fake) -> None:
    every = PascalImages(prepared.voc, "trainaug", 0, "test")
    big = PascalImages(prepared.voc, "trainaug", 0, "test", min_object_pixels=2 * 32 * 32)
    assert every.images_with(1) == ("2007_000032", "2008_000002")  # PANet: any pixel
    assert big.images_with(1) == ("2007_000032",)  # 80 px aeroplane dropped
    assert big.images_with(5) == ()  # the 100 px bottle
    exact = PascalImages(prepared.voc, "trainaug", 0, "test", min_object_pixels=80)
    assert exact.images_with(1) == ("2007_000032", "2008_000002")  # threshold is inclusive


def test_load(prepared: Fake) -> None:
    ds = PascalImages(prepared.voc, "val", 2, "test")
    image, label = ds.load("2007_000129")
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(label, prepared.expected["2007_000129"])


def test_cache_reuse_and_rebuild(prepared: Fake) -> None:
    path = cache_path(prepared.voc, "trainaug")
    payload = json.loads(path.read_text())
    payload["classes"]["13"] = [["2008_000008", 7]]  # tamper, keeping the signature
    path.write_text(json.dumps(payload))
    assert load_class_index(prepared.voc, "trainaug").pixels[13] == {"2008_000008": 7}
    ds = PascalImages(prepared.voc, "trainaug", 0, "train", min_object_pixels=8)
    assert ds.images_with(13) == ()  # the dataset really used the cached counts
    # A new label file makes the cache stale: it is rebuilt with the true counts.
    label_dir = prepared.voc / "SegmentationClassAug"
    Image.fromarray(np.zeros((H, W), np.uint8)).save(label_dir / "2009_000001.png")
    assert load_class_index(prepared.voc, "trainaug").pixels[13] == {"2008_000008": 40 * 56}
    assert json.loads(path.read_text())["classes"]["13"] == [["2008_000008", 40 * 56]]
    # A damaged cache file is rebuilt too.
    path.write_text("{not json")
    assert load_class_index(prepared.voc, "trainaug").pixels[13] == {"2008_000008": 40 * 56}


def test_a_cache_that_cannot_be_written_is_a_logged_warning(
    prepared: Fake, monkeypatch, capsys
) -> None:
    from mfnet.data import pascal

    def read_only(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(pascal, "atomic_write_bytes", read_only)
    configure_logging()  # as the commands do: warnings on stderr
    index = load_class_index(prepared.voc, "trainaug", rebuild=True, progress=False)
    assert index.pixels[13] == {"2008_000008": 40 * 56}  # the index itself is still built
    err = capsys.readouterr().err
    assert err.startswith("warning: could not write the class-list cache ")
    assert "Permission denied" in err and err.count("\n") == 1


def test_rerun_is_idempotent_and_resumes(prepared: Fake) -> None:
    tracked = sorted((prepared.voc / "SegmentationClassAug").glob("*.png"))
    tracked += sorted((prepared.voc / "ImageSets" / "SegmentationAug").glob("*.txt"))
    tracked += sorted((prepared.voc / "mfnet_lists").glob("*.json"))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tracked}
    report = prepare(prepared.voc, prepared.sbd, progress=False)
    assert (report.from_voc, report.from_sbd, report.skipped) == (0, 0, 7)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tracked} == before
    # An interrupted run: one label missing, a temporary file left behind.
    label_dir = prepared.voc / "SegmentationClassAug"
    (label_dir / "2008_000003.png").unlink()
    (label_dir / ".2008_000008.png.abc123.tmp").write_bytes(b"partial")
    report = prepare(prepared.voc, prepared.sbd, progress=False)
    assert (report.from_voc, report.from_sbd, report.skipped) == (0, 1, 6)
    assert not list(label_dir.glob(".*.tmp"))
    np.testing.assert_array_equal(
        np.asarray(Image.open(label_dir / "2008_000003.png")), prepared.expected["2008_000003"]
    )


def test_command_line(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--sbd-root" in capsys.readouterr().out
    args = ["--voc-root", str(fake.voc), "--sbd-root", str(fake.sbd), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 from VOC, 3 from SBD, 0 already present" in out
    assert "trainaug: 5 images (the complete releases give 10582)" in out
    assert main(["--voc-root", str(fake.voc.parent / "missing"), "--quiet"]) == 1
    assert "error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- clear errors


def test_error_missing_root_and_folders(fake: Fake, tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        PascalImages(tmp_path / "nowhere", "val", 0, "test")
    assert "nowhere" in str(err.value) and "PASCAL VOC site" in str(err.value)
    assert "Berkeley SBD page" in str(err.value)
    with pytest.raises(DatasetError, match="SegmentationClassAug") as err:
        PascalImages(fake.voc, "val", 0, "test")  # not prepared yet
    assert f"python -m mfnet.data.prepare_pascal --voc-root {fake.voc}" in str(err.value)
    prepare(fake.voc, fake.sbd, progress=False)
    (fake.voc / "ImageSets" / "SegmentationAug" / "trainaug.txt").unlink()
    with pytest.raises(DatasetError, match=r"trainaug\.txt.*prepare_pascal"):
        PascalImages(fake.voc, "trainaug", 0, "train")
    os.rename(fake.voc / "JPEGImages", fake.voc / "JPEGImages.bak")
    with pytest.raises(DatasetError, match="JPEGImages"):
        PascalImages(fake.voc, "val", 0, "test")
    with pytest.raises(DatasetError, match="JPEGImages"):
        prepare(fake.voc, fake.sbd, progress=False)


def test_error_missing_and_corrupt_files(prepared: Fake) -> None:
    ds = PascalImages(prepared.voc, "val", 0, "test")
    jpeg = prepared.voc / "JPEGImages" / "2007_000123.jpg"
    png = prepared.voc / "SegmentationClassAug" / "2007_000129.png"
    jpeg.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DatasetError, match="not a readable") as err:
        ds.load("2007_000123")
    assert str(jpeg) in str(err.value)
    jpeg.unlink()
    with pytest.raises(DatasetError, match="not found") as err:
        ds.load("2007_000123")
    assert str(jpeg) in str(err.value)
    png.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match="not a readable PNG") as err:
        ds.load("2007_000129")
    assert str(png) in str(err.value)
    png.unlink()
    with pytest.raises(DatasetError, match="prepare_pascal") as err:
        ds.load("2007_000129")
    assert str(png) in str(err.value)


def test_error_label_values_out_of_range(prepared: Fake) -> None:
    png = prepared.voc / "SegmentationClassAug" / "2008_000008.png"
    label = prepared.expected["2008_000008"].copy()
    label[0, 0], label[1, 1] = 100, 30
    Image.fromarray(label).save(png)
    ds = PascalImages(prepared.voc, "trainaug", 0, "train")
    with pytest.raises(DatasetError, match="outside 0..20 and 255: 30, 100") as err:
        ds.load("2008_000008")
    assert str(png) in str(err.value)
    with pytest.raises(DatasetError, match="30, 100"):
        load_class_index(prepared.voc, "trainaug", rebuild=True, progress=False)


def test_error_corrupt_or_missing_sbd(fake: Fake) -> None:
    mat = fake.sbd / "dataset" / "cls" / "2008_000003.mat"
    mat.write_bytes(b"MATLAB 5.0 garbage" * 4)
    with pytest.raises(DatasetError, match="not a readable SBD .mat") as err:
        prepare(fake.voc, fake.sbd, progress=False)
    assert str(mat) in str(err.value)
    mat.unlink()
    with pytest.raises(DatasetError, match="no annotation for image 2008_000003"):
        prepare(fake.voc, fake.sbd, progress=False)
    with pytest.raises(DatasetError, match="Berkeley SBD page"):
        prepare(fake.voc, fake.voc, progress=False)  # not an SBD folder
    (fake.voc / "JPEGImages" / "2008_000008.jpg").unlink()
    with pytest.raises(DatasetError, match="no JPEG.*2008_000008"):
        prepare(fake.voc, fake.sbd, progress=False)


def test_error_arguments(prepared: Fake) -> None:
    ds = PascalImages(prepared.voc, "val", 0, "test")
    for bad in (0, 21, -1):
        with pytest.raises(DatasetError, match="1..20"):
            ds.images_with(bad)
        with pytest.raises(ValueError):
            ds.images_with(bad)
    for fold in (4, -1):
        with pytest.raises(DatasetError, match="fold must be an int in 0..3"):
            PascalImages(prepared.voc, "val", fold, "test")
    with pytest.raises(ValueError, match="split"):
        PascalImages(prepared.voc, "train", 0, "train")
    with pytest.raises(ValueError, match="role"):
        PascalImages(prepared.voc, "val", 0, "support")
