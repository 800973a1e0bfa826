"""Tests of the embedded synthetic benchmark (mfnet.data.synthetic)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mfnet.data.synthetic import (
    FAMILIES,
    IGNORE_INDEX,
    NUM_CLASSES,
    NUM_FOLDS,
    SyntheticScenes,
    base_classes,
    boundary_band,
    class_style,
    novel_classes,
)

SIZE = 64


@pytest.fixture(scope="module")
def scenes() -> SyntheticScenes:
    return SyntheticScenes(SIZE)


def test_folds_partition_classes() -> None:
    novel = [novel_classes(f) for f in range(NUM_FOLDS)]
    assert sorted(itertools.chain(*novel)) == list(range(1, NUM_CLASSES + 1))
    assert novel[1] == (6, 7, 8, 9, 10)
    for fold in range(NUM_FOLDS):
        base = base_classes(fold)
        assert len(base) == 15 and not set(base) & set(novel[fold])
        assert set(base) | set(novel[fold]) == set(range(1, NUM_CLASSES + 1))


@pytest.mark.parametrize("fold", [-1, 4, 1.0, "0"])
def test_bad_fold_raises(fold: object) -> None:
    with pytest.raises(ValueError, match="fold"):
        novel_classes(fold)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fold"):
        base_classes(fold)  # type: ignore[arg-type]


def test_class_styles_distinct_and_mixed_per_fold() -> None:
    styles = {c: class_style(c) for c in range(1, NUM_CLASSES + 1)}
    assert class_style(7) == styles[7]  # a pure function of the id
    for fold in range(NUM_FOLDS):
        # Every fold holds one class of each pattern family, so novel classes share the
        # generative families of the base classes.
        assert {styles[c].family for c in novel_classes(fold)} == set(FAMILIES)
        assert len({styles[c].frequency for c in novel_classes(fold)}) >= 3
    for a, b in itertools.combinations(styles.values(), 2):
        if a.family == b.family:
            hue_gap = min(abs(a.hue - b.hue), 1 - abs(a.hue - b.hue))
            assert hue_gap >= 0.2 and a.frequency != b.frequency
    for s in styles.values():  # colour a is bright, colour b dark: never a swapped pair
        assert sum(s.colour_a) > 1.5 * sum(s.colour_b)


def test_render_shapes_dtypes_and_determinism(scenes: SyntheticScenes) -> None:
    image, label = scenes.render(np.random.default_rng(3), [4, 9], [15])
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert label.shape == (SIZE, SIZE) and label.dtype == np.uint8
    image2, label2 = scenes.render(np.random.default_rng(3), [4, 9], [15])
    np.testing.assert_array_equal(image, image2)
    np.testing.assert_array_equal(label, label2)
    image3, _ = scenes.render(np.random.default_rng(4), [4, 9], [15])
    assert np.abs(image.astype(int) - image3).mean() > 5
    assert scenes.draw(np.random.default_rng(3), [4, 9], [15])[0].tobytes() == image.tobytes()


def test_present_classes_visible_and_labels_valid(scenes: SyntheticScenes) -> None:
    rng = np.random.default_rng(0)
    min_pixels = scenes.min_visible_fraction * SIZE * SIZE
    for _ in range(40):
        classes = rng.choice(np.arange(1, NUM_CLASSES + 1), size=6, replace=False).tolist()
        n_present = int(rng.integers(1, 5))
        present, distractors = classes[:n_present], classes[n_present:]
        _, label = scenes.render(rng, present, distractors)
        assert set(np.unique(label).tolist()) <= {0, IGNORE_INDEX, *classes}
        counts = np.bincount(label.ravel(), minlength=256)
        assert all(counts[c] >= min_pixels for c in present)
        assert counts[0] > 0  # background is never fully covered


def test_boundary_bands_separate_regions_and_are_thin(scenes: SyntheticScenes) -> None:
    rng = np.random.default_rng(1)
    fractions = []
    for _ in range(30):
        _, label = scenes.render(rng, [1, 2], [3, 4])
        ok = label != IGNORE_INDEX
        # Two 4-adjacent non-ignore pixels never differ: every object boundary is banded.
        for a, b, va, vb in (
            (label[1:], label[:-1], ok[1:], ok[:-1]),
            (label[:, 1:], label[:, :-1], ok[:, 1:], ok[:, :-1]),
        ):
            assert not np.any(va & vb & (a != b))
        fractions.append((~ok).mean())
    assert 0.01 < np.mean(fractions) < 0.25


@pytest.mark.parametrize("width", [1, 2, 3, 5])
def test_boundary_band_has_requested_width(width: int) -> None:
    label = np.zeros((20, 20), np.uint8)
    label[:, 10:] = 7
    band = boundary_band(label, width)
    assert band.sum(axis=1).tolist() == [width] * 20  # a straight edge: exactly `width` columns
    assert band[:, 10 - (width + 1) // 2 : 10 + width // 2].all()
    assert not boundary_band(np.full((8, 8), 3, np.uint8), width).any()


def test_band_width_scales_with_image_size() -> None:
    assert SyntheticScenes(64).band_width == 1
    assert SyntheticScenes(300).band_width == 3
    assert SyntheticScenes(473).band_width == 5  # VOC-like at the paper's resolution


def _colour_feature(image: np.ndarray, label: np.ndarray, class_id: int) -> np.ndarray:
    """Mean RGB of the brighter and of the darker half of a class's pixels (6 values in [0, 1])."""
    pixels = image[label == class_id].astype(np.float32) / 255.0
    luminance = pixels.mean(axis=1)
    bright = luminance >= np.median(luminance)
    return np.concatenate([pixels[bright].mean(axis=0), pixels[~bright].mean(axis=0)])


def test_appearance_is_class_specific(scenes: SyntheticScenes) -> None:
    rng = np.random.default_rng(2)
    feats, ids = [], []
    for c in range(1, NUM_CLASSES + 1):
        for _ in range(3):
            image, label = scenes.render(rng, [c], [])
            feats.append(_colour_feature(image, label, c))
            ids.append(c)
    f, y = np.asarray(feats), np.asarray(ids)
    dist = np.linalg.norm(f[:, None] - f[None], axis=-1)
    same = (y[:, None] == y[None]) & ~np.eye(len(y), dtype=bool)
    assert dist[same].mean() < 0.5 * dist[y[:, None] != y[None]].mean()
    np.fill_diagonal(dist, np.inf)
    # Instances vary (never pixel-identical), yet colour alone finds the class's other
    # instances far above chance (1/20); the pattern family separates the rest.
    assert dist[same].min() > 0.0
    assert (y[dist.argmin(axis=1)] == y).mean() > 0.4


def test_pattern_families_differ_in_texture(scenes: SyntheticScenes) -> None:
    """Stripes vary along one direction only; checkerboards along both (gradient anisotropy)."""

    def anisotropy(class_id: int, seed: int) -> float:
        image, label = scenes.render(np.random.default_rng(seed), [class_id], [])
        grey = image.astype(np.float32).mean(axis=2)
        inside = label == class_id
        gy, gx = np.gradient(grey)
        gy, gx = gy[inside], gx[inside]
        tensor = np.array([[gx @ gx, gx @ gy], [gx @ gy, gy @ gy]])
        low, high = np.linalg.eigvalsh(tensor)
        return float(low / high)

    stripes = [c for c in range(1, 21) if class_style(c).family == "stripes"]
    checkers = [c for c in range(1, 21) if class_style(c).family == "checker"]
    stripe_ratio = np.mean([anisotropy(c, s) for c in stripes for s in range(3)])
    checker_ratio = np.mean([anisotropy(c, s) for c in checkers for s in range(3)])
    assert stripe_ratio < 0.5 * checker_ratio


def test_invalid_arguments(scenes: SyntheticScenes) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at least one"):
        scenes.render(rng, [])
    for bad in (0, 21, 255):
        with pytest.raises(ValueError, match="1..20"):
            scenes.render(rng, [bad])
        with pytest.raises(ValueError, match="1..20"):
            scenes.render(rng, [1], [bad])
    with pytest.raises(ValueError, match="distinct"):
        scenes.render(rng, [3], [3])
    with pytest.raises(ValueError, match="image_size"):
        SyntheticScenes(16)
    with pytest.raises(ValueError, match="1..20"):
        class_style(21)
