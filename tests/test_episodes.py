"""Tests of the N-way K-shot episode sampler (mfnet.data.episodes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from mfnet.data import (
    EpisodeDataset,
    EpisodeSpec,
    SceneSource,
    SyntheticScenes,
    base_classes,
    novel_classes,
    synthetic_episodes,
)
from mfnet.ops.masked_pooling import mask_area

SIZE = 48


class RecordingSource:
    """Wraps a source and records every draw: (present, distractors, raw label)."""

    def __init__(self, source: SceneSource) -> None:
        self.source = source
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...], np.ndarray]] = []

    def draw(
        self, rng: np.random.Generator, present: Sequence[int], distractors: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.source.draw(rng, present, distractors)
        self.calls.append((tuple(present), tuple(distractors), label.copy()))
        return image, label


def _recorded(fold: int, split: str, way: int, shot: int, n: int, seed: int = 0):
    pool = base_classes(fold) if split == "train" else novel_classes(fold)
    source = RecordingSource(SyntheticScenes(SIZE))
    return source, EpisodeDataset(source, EpisodeSpec(way, shot, pool), n, seed)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_synthetic_scenes_is_a_scene_source() -> None:
    assert isinstance(SyntheticScenes(SIZE), SceneSource)


def test_episodes_are_deterministic_and_order_independent() -> None:
    ds = synthetic_episodes(0, "train", way=2, shot=2, num_episodes=6, seed=5, image_size=SIZE)
    later_first = [ds[4], ds[1]]
    again = synthetic_episodes(0, "train", way=2, shot=2, num_episodes=6, seed=5, image_size=SIZE)
    _assert_same(later_first[0], again[4])
    _assert_same(later_first[1], again[1])
    _assert_same(ds[-2], ds[4])
    assert not torch.equal(ds[1]["query_image"], ds[2]["query_image"])
    assert not torch.equal(ds[1]["support_images"], ds[2]["support_images"])
    other_seed = synthetic_episodes(0, "train", 2, 2, 6, seed=6, image_size=SIZE)
    assert not torch.equal(ds[1]["query_image"], other_seed[1]["query_image"])


def test_shapes_and_dtypes_after_default_collate() -> None:
    way, shot = 3, 2
    ds = synthetic_episodes(2, "test", way, shot, num_episodes=2, seed=0, image_size=SIZE)
    assert len(ds) == 2
    batch = default_collate([ds[0], ds[1]])
    expected = {
        "support_images": ((2, way, shot, 3, SIZE, SIZE), torch.float32),
        "support_masks": ((2, way, shot, SIZE, SIZE), torch.uint8),
        "query_image": ((2, 3, SIZE, SIZE), torch.float32),
        "query_label": ((2, SIZE, SIZE), torch.int64),
        "episode_classes": ((2, way), torch.int64),
    }
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == expected
    for key in ("support_images", "query_image"):
        assert 0.0 <= batch[key].min() and batch[key].max() <= 1.0
        assert batch[key].std() > 0.05  # real images, not constants
    assert set(batch["episode_classes"].flatten().tolist()) <= set(novel_classes(2))


@pytest.mark.parametrize("fold", range(4))
def test_train_episodes_never_show_novel_classes(fold: int) -> None:
    source, ds = _recorded(fold, "train", way=3, shot=1, n=8)
    for i in range(len(ds)):
        assert set(ds[i]["episode_classes"].tolist()) <= set(base_classes(fold))
    seen = set()
    for present, distractors, label in source.calls:
        seen |= set(present) | set(distractors) | set(np.unique(label).tolist())
    assert seen - {0, 255} <= set(base_classes(fold))
    assert not seen & set(novel_classes(fold))


def test_test_episodes_only_use_novel_classes() -> None:
    source, ds = _recorded(1, "test", way=2, shot=1, n=6)
    for i in range(len(ds)):
        ds[i]
    for _present, _distractors, label in source.calls:
        assert set(np.unique(label).tolist()) - {0, 255} <= set(novel_classes(1))


def test_multiway_protocol_masks_and_query_labels() -> None:
    way, shot = 3, 2
    source, ds = _recorded(0, "train", way, shot, n=12)
    query_counts = []
    band_fractions = []
    for i in range(len(ds)):
        source.calls.clear()
        ep = ds[i]
        classes = ep["episode_classes"].tolist()
        assert len(set(classes)) == way
        assert len(source.calls) == way * shot + 1
        # Supports: way-major order, the way-n class present, distractors from the pool.
        for n in range(way):
            for k in range(shot):
                present, distractors, label = source.calls[n * shot + k]
                assert present == (classes[n],)
                assert classes[n] not in distractors and len(distractors) <= 2
                assert set(distractors) <= set(base_classes(0))
                mask = ep["support_masks"][n, k].numpy()
                assert set(np.unique(mask).tolist()) <= {0, 1, 255}
                assert (mask == 1).sum() > 0
                np.testing.assert_array_equal(mask == 1, label == classes[n])
                np.testing.assert_array_equal(mask == 255, label == 255)
        # Query: 1..N episode classes, distractors from outside the episode, remapped labels.
        present, distractors, raw = source.calls[-1]
        assert 1 <= len(present) <= way and set(present) <= set(classes)
        assert not set(distractors) & set(classes)
        query = ep["query_label"].numpy()
        assert set(np.unique(query).tolist()) <= set(range(way + 1)) | {255}
        expected = np.zeros_like(query)
        for j, c in enumerate(classes):
            expected[raw == c] = j + 1
        expected[raw == 255] = 255
        np.testing.assert_array_equal(query, expected)
        assert {j + 1 for j, c in enumerate(classes) if c in present} == set(
            np.unique(query).tolist()
        ) - {0, 255}
        query_counts.append(len(present))
        band_fractions.append((query == 255).mean())
    assert min(query_counts) == 1 and max(query_counts) > 1  # the query holds 1..N classes
    assert 0.01 < np.mean(band_fractions) < 0.25


def test_query_may_hold_every_episode_class() -> None:
    source, ds = _recorded(3, "train", way=2, shot=1, n=20)
    sizes = set()
    for i in range(len(ds)):
        source.calls.clear()
        ds[i]
        sizes.add(len(source.calls[-1][0]))
    assert sizes == {1, 2}


def test_no_distractors_when_disabled() -> None:
    source = RecordingSource(SyntheticScenes(SIZE))
    ds = EpisodeDataset(source, EpisodeSpec(2, 1, (1, 2, 3, 4), max_distractors=0), 5, 0)
    for i in range(len(ds)):
        ds[i]
    assert all(distractors == () for _, distractors, _ in source.calls)


def test_spec_accepts_any_sequence_and_freezes_it() -> None:
    spec = EpisodeSpec(way=2, shot=1, class_pool=[3, 4, 5])  # type: ignore[arg-type]
    assert spec.class_pool == (3, 4, 5)
    with pytest.raises(AttributeError):
        spec.way = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(way=0, shot=1, class_pool=(1, 2)), "way"),
        (dict(way=3, shot=1, class_pool=(1, 2)), "way=3 exceeds"),
        (dict(way=1, shot=0, class_pool=(1, 2)), "shot"),
        (dict(way=1, shot=1, class_pool=(1, 1)), "duplicate"),
        (dict(way=1, shot=1, class_pool=(0, 1)), "1..254"),
        (dict(way=1, shot=1, class_pool=(1, 2), max_distractors=-1), "max_distractors"),
    ],
)
def test_bad_spec_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EpisodeSpec(**kwargs)


def test_bad_helper_arguments_raise() -> None:
    with pytest.raises(ValueError, match="split"):
        synthetic_episodes(0, "val", 1, 1, 1, 0)
    with pytest.raises(ValueError, match="fold"):
        synthetic_episodes(4, "train", 1, 1, 1, 0)
    with pytest.raises(ValueError, match="way=6 exceeds"):
        synthetic_episodes(0, "test", 6, 1, 1, 0)  # only 5 novel classes per fold
    with pytest.raises(ValueError, match="num_episodes"):
        synthetic_episodes(0, "train", 1, 1, -1, 0)
    with pytest.raises(ValueError, match="seed"):
        synthetic_episodes(0, "train", 1, 1, 1, -1)
    ds = synthetic_episodes(0, "train", 1, 1, 3, 0, image_size=SIZE)
    with pytest.raises(IndexError):
        ds[3]
    # Class ids unknown to the synthetic source fail when drawn, naming the valid range.
    bad = EpisodeDataset(SyntheticScenes(SIZE), EpisodeSpec(1, 1, (21, 22)), 1, 0)
    with pytest.raises(ValueError, match="1..20"):
        bad[0]


class _TinyObjectSource:
    """Draws the class as a single pixel, which vanishes at any coarse feature resolution."""

    def draw(self, rng, present, distractors):
        image = np.zeros((48, 48, 3), np.uint8)
        label = np.zeros((48, 48), np.uint8)
        label[3, 3] = present[0]
        return image, label


def test_support_shots_that_vanish_at_feature_resolution_are_redrawn() -> None:
    # At 48 px and feature side 3 the bilinear samples are 23.5 px apart: many small objects
    # would vanish, and every kept shot must still weigh at least one feature cell.
    episodes = synthetic_episodes(
        fold=0, split="train", way=2, shot=2, num_episodes=30, seed=1, image_size=48, feature_size=3
    )
    for index in range(len(episodes)):
        masks = episodes[index]["support_masks"].flatten(0, 1) == 1  # [N*K, H, W]
        assert bool((mask_area(masks, (3, 3)) >= 1.0).all())
    spec = EpisodeSpec(way=1, shot=1, class_pool=(1,), feature_size=6)
    with pytest.raises(RuntimeError, match="use larger images"):
        EpisodeDataset(_TinyObjectSource(), spec, num_episodes=1, seed=0)[0]
