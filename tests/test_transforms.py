"""Tests of the paired image/label transforms (mfnet.data.transforms)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mfnet.data.transforms import (
    IGNORE_INDEX,
    MEAN_RGB,
    TestResize,
    TrainAugment,
    train_augment,
)

RED, GREEN, GRAY = (230, 20, 20), (20, 220, 20), (128, 128, 128)


def _pattern(h: int = 60, w: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Gray background (label 0), a red block (label 1) left of a green block (label 2)."""
    image = np.empty((h, w, 3), np.uint8)
    image[:] = GRAY
    label = np.zeros((h, w), np.uint8)
    image[10:50, 8:36], label[10:50, 8:36] = RED, 1
    image[15:45, 46:72], label[15:45, 46:72] = GREEN, 2
    return image, label


def _interior(label: np.ndarray, value: int, radius: int = 3) -> np.ndarray:
    """bool [H, W]: pixels whose (2 radius + 1)^2 neighbourhood is entirely ``value``."""
    h, w = label.shape
    padded = np.pad(label == value, radius, constant_values=False)
    out = np.ones((h, w), bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out &= padded[dy : dy + h, dx : dx + w]
    return out


def _noise_label(h: int, w: int, values: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.array(values, np.uint8), size=(h, w))


def test_train_augment_shapes_dtypes_and_determinism() -> None:
    image, label = _pattern()
    aug = TrainAugment(48)
    a = aug(image, label, np.random.default_rng(3))
    b = aug(image, label, np.random.default_rng(3))
    assert a[0].shape == (48, 48, 3) and a[0].dtype == np.uint8
    assert a[1].shape == (48, 48) and a[1].dtype == np.uint8
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    outputs = [aug(image, label, np.random.default_rng(s))[1] for s in range(6)]
    assert any(not np.array_equal(outputs[0], o) for o in outputs[1:])


def test_train_augment_keeps_image_and_label_aligned() -> None:
    image, label = _pattern()
    aug = TrainAugment(48, scale=(0.8, 1.25), rotate=10.0, blur_p=1.0, flip_p=0.5, rotate_p=1.0)
    for seed in range(12):
        out_image, out_label = aug(image, label, np.random.default_rng(seed))
        rgb = out_image.astype(int)
        red, green, bg = (_interior(out_label, v) for v in (1, 2, 0))
        assert red.any() or green.any()  # the crop always keeps some object interior
        assert (rgb[red, 0] > 170).all() and (rgb[red, 1] < 80).all()
        assert (rgb[green, 1] > 170).all() and (rgb[green, 0] < 80).all()
        assert (np.abs(rgb[bg] - 128) < 30).all()


def test_train_augment_flip_moves_image_and_label_together() -> None:
    image, label = _pattern()
    flip = TrainAugment(80, scale=(1.0, 1.0), blur_p=0.0, flip_p=1.0, rotate_p=0.0)
    out_image, out_label = flip(image, label, np.random.default_rng(0))
    # Centred padding of the 60 rows to 80 adds 10 rows on top; columns are not padded.
    assert np.array_equal(out_label[10:70], label[:, ::-1])
    assert np.array_equal(out_image[10:70], image[:, ::-1])
    cols = np.nonzero(out_label == 1)[1].mean(), np.nonzero(out_label == 2)[1].mean()
    assert cols[0] > cols[1]  # red now right of green


def test_train_augment_pads_small_images_with_mean_and_ignore() -> None:
    image, label = _pattern(40, 60)
    aug = TrainAugment(64, scale=(1.0, 1.0), blur_p=0.0, flip_p=0.0, rotate_p=0.0)
    out_image, out_label = aug(image, label, np.random.default_rng(0))
    top, left = 12, 2  # (64 - 40) // 2, (64 - 60) // 2
    assert np.array_equal(out_image[top : top + 40, left : left + 60], image)
    assert np.array_equal(out_label[top : top + 40, left : left + 60], label)
    outside = np.ones((64, 64), bool)
    outside[top : top + 40, left : left + 60] = False
    assert (out_label[outside] == IGNORE_INDEX).all()
    assert (out_image[outside] == MEAN_RGB).all()


def test_train_augment_rotation_fills_borders_with_mean_and_ignore() -> None:
    image = np.empty((48, 48, 3), np.uint8)
    image[:] = RED
    label = np.ones((48, 48), np.uint8)
    aug = TrainAugment(48, scale=(1.0, 1.0), rotate=30.0, blur_p=0.0, flip_p=0.0, rotate_p=1.0)
    filled = 0
    for seed in range(5):
        out_image, out_label = aug(image, label, np.random.default_rng(seed))
        assert set(np.unique(out_label)) <= {1, IGNORE_INDEX}
        deep = _interior(out_label, IGNORE_INDEX, radius=2)  # away from bilinear edge blending
        assert (out_image[deep] == MEAN_RGB).all()
        assert (out_image[_interior(out_label, 1, radius=2)] == RED).all()
        filled += int(deep.sum())
    assert filled > 0


def test_train_augment_never_creates_label_values() -> None:
    label = _noise_label(37, 53, (0, 3, 7, 200))
    image = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    aug = TrainAugment(41, scale=(0.7, 1.4), rotate=20.0, rotate_p=1.0)
    for seed in range(6):
        _, out_label = aug(image, label, np.random.default_rng(seed))
        assert set(np.unique(out_label)) <= {0, 3, 7, 200, IGNORE_INDEX}


def test_train_augment_blur_uses_pfenet_sigma() -> None:
    image = np.zeros((48, 48, 3), np.uint8)
    image[:, 24:] = 255
    label = np.zeros((48, 48), np.uint8)
    blur = TrainAugment(48, scale=(1.0, 1.0), blur_p=1.0, flip_p=0.0, rotate_p=0.0)
    out_image, out_label = blur(image, label, np.random.default_rng(0))
    assert np.array_equal(out_label, label)
    row = out_image[24, :, 0].astype(int)
    assert 0 < row[23] < 128 < row[24] < 255  # the step is smoothed
    assert row[19] == 0 and row[28] == 255  # within a few pixels, as a 5x5 kernel


def test_paper_augmentation_resizes_to_a_square_first_without_scale_or_blur() -> None:
    """Sec. IV-B: resized to S x S (aspect ratio ignored), then rotation, mirror, random crop; no
    scale jitter, no blur. Without rotation and mirror the output is the stretched image."""
    image, label = _pattern()  # 60 x 80, labels 0, 1, 2
    assert len(np.unique(label)) == 3
    paper = train_augment("paper", 48)
    assert (paper.resize_to, paper.scale, paper.blur_p) == (48, (1.0, 1.0), 0.0)
    assert (paper.rotate, paper.rotate_p, paper.flip_p) == (10.0, 0.5, 0.5)
    still = TrainAugment(48, scale=(1.0, 1.0), blur_p=0.0, flip_p=0.0, rotate_p=0.0, resize_to=48)
    stretched = TestResize(48, "stretch")(image, label)
    for seed in range(3):
        out = still(image, label, np.random.default_rng(seed))
        assert np.array_equal(out[0], stretched[0]) and np.array_equal(out[1], stretched[1])
    mirrored = 0
    for seed in range(12):  # rotation and mirror are drawn; the square resize always happens
        out_image, out_label = paper(image, label, np.random.default_rng(seed))
        assert out_label.shape == (48, 48) and set(np.unique(out_label)) <= {0, 1, 2, 255}
        mirrored += int(np.array_equal(out_label, stretched[1][:, ::-1]))
    assert mirrored > 0  # some draws are a plain mirror of the stretched image


def test_paper_augmentation_crop_moves_inside_a_larger_square() -> None:
    image, label = _pattern()
    crop = TrainAugment(48, scale=(1.0, 1.0), blur_p=0.0, flip_p=0.0, rotate_p=0.0, resize_to=64)
    big_image, big_label = TestResize(64, "stretch")(image, label)
    corners = set()
    for seed in range(8):
        out_image, out_label = crop(image, label, np.random.default_rng(seed))
        hits = [
            (top, left)
            for top in range(17)
            for left in range(17)
            if np.array_equal(out_label, big_label[top : top + 48, left : left + 48])
            and np.array_equal(out_image, big_image[top : top + 48, left : left + 48])
        ]
        assert hits, seed  # a window of the 64 x 64 square
        corners.add(hits[0])
    assert len(corners) > 1


def test_pfenet_augmentation_is_the_default_recipe_and_errors_are_clear() -> None:
    pfenet = train_augment("pfenet", 48)
    assert (pfenet.resize_to, pfenet.scale, pfenet.blur_p) == (None, (0.9, 1.1), 0.5)
    image, label = _pattern()
    a = pfenet(image, label, np.random.default_rng(4))
    b = TrainAugment(48)(image, label, np.random.default_rng(4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="augmentation must be one of"):
        train_augment("panet", 48)
    with pytest.raises(ValueError, match="applies to the 'paper' augmentation only"):
        train_augment("pfenet", 48, resize_to=64)
    with pytest.raises(ValueError, match="must be at least the crop size 48"):
        train_augment("paper", 48, resize_to=40)


def test_test_resize_pad_keeps_aspect_and_pads_bottom_right() -> None:
    image, label = _pattern(40, 60)
    out_image, out_label = TestResize(30)(image, label)
    assert out_image.shape == (30, 30, 3) and out_label.shape == (30, 30)
    # 40x60 -> 20x30 at the top-left, the same 2:3 aspect ratio.
    expected = np.asarray(Image.fromarray(label).resize((30, 20), Image.Resampling.NEAREST))
    assert np.array_equal(out_label[:20], expected)
    assert (out_label[20:] == IGNORE_INDEX).all() and (out_image[20:] == 0).all()
    assert out_image[:20].mean() > 50  # the content is there
    # A tall image is padded on the right instead.
    tall_image, tall_label = _pattern(60, 40)
    tall_out, tall_lab = TestResize(30)(tall_image, tall_label)
    assert (tall_lab[:, 20:] == IGNORE_INDEX).all() and (tall_out[:, 20:] == 0).all()
    assert (tall_lab[:, :20] != IGNORE_INDEX).all()


def test_test_resize_pad_multiple_floors_sides() -> None:
    resize = TestResize(30, multiple=8)
    assert resize.resized_shape(40, 60) == (16, 24)
    assert TestResize(473, multiple=8).resized_shape(375, 500) == (352, 472)
    out_image, out_label = resize(*_pattern(40, 60))
    assert (out_label[16:] == IGNORE_INDEX).all() and (out_label[:, 24:] == IGNORE_INDEX).all()
    assert (out_label[:16, :24] != IGNORE_INDEX).all()


def test_test_resize_stretch_ignores_aspect_ratio() -> None:
    image, label = _pattern(40, 60)
    out_image, out_label = TestResize(32, mode="stretch")(image, label)
    assert out_image.shape == (32, 32, 3) and out_label.shape == (32, 32)
    assert set(np.unique(out_label)) == {0, 1, 2}  # no padding, no new values
    expected = np.asarray(Image.fromarray(label).resize((32, 32), Image.Resampling.NEAREST))
    assert np.array_equal(out_label, expected)


def test_test_resize_never_creates_label_values() -> None:
    image = np.zeros((37, 53, 3), np.uint8)
    label = _noise_label(37, 53, (0, 5, 9))
    for size, mode in ((24, "pad"), (24, "stretch"), (80, "pad"), (80, "stretch")):
        resize = TestResize(size, mode)
        assert set(np.unique(resize(image, label)[1])) <= {0, 5, 9, IGNORE_INDEX}


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: TrainAugment(0), "size must be a positive int"),
        (lambda: TrainAugment(8, scale=(1.2, 0.9)), "scale must be"),
        (lambda: TrainAugment(8, rotate=-1.0), "rotate must be >= 0"),
        (lambda: TrainAugment(8, blur_p=1.5), "blur_p must be a probability"),
        (lambda: TrainAugment(8, flip_p=-0.1), "flip_p must be a probability"),
        (lambda: TrainAugment(8, rotate_p=2.0), "rotate_p must be a probability"),
        (lambda: TestResize(8, mode="crop"), "mode must be one of"),
        (lambda: TestResize(-3), "size must be a positive int"),
        (lambda: TestResize(8, multiple=9), "multiple must be in"),
    ],
)
def test_constructor_errors(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_call_errors() -> None:
    image, label = _pattern(20, 30)
    with pytest.raises(ValueError, match=r"image must be uint8 \[H, W, 3\]"):
        TestResize(8)(image.astype(np.float32), label)
    with pytest.raises(ValueError, match="label must be uint8"):
        TestResize(8)(image, label[:10])
    with pytest.raises(ValueError, match="label must be uint8"):
        TrainAugment(8)(image, label.astype(np.int64), np.random.default_rng(0))
    with pytest.raises(TypeError, match="needs a np.random.Generator"):
        TrainAugment(8)(image, label, None)
