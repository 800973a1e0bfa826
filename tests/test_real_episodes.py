"""Tests of N-way K-shot episodes over labelled real images (mfnet.data.real_episodes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from mfnet.data.errors import DatasetArgumentError
from mfnet.data.real_episodes import ImageEpisodes, LabelledImages
from mfnet.data.transforms import IGNORE_INDEX, TestResize, TrainAugment

H, W, S = 40, 60, 32
PERSON, BASE = 15, 9  # BASE is in the images but not among the sampled classes
COLOURS = {
    1: (220, 30, 30),
    2: (30, 200, 30),
    3: (30, 30, 220),
    4: (220, 220, 30),
    BASE: (200, 30, 200),
    PERSON: (30, 200, 200),
}
# Three object slots (rows, cols) of a 40x60 image; a 1-pixel 255 band surrounds each object.
SLOTS = ((slice(4, 36), slice(2, 18)), (slice(4, 36), slice(22, 38)), (slice(4, 36), slice(42, 58)))
# image id -> class in slot 0, 1, 2 (0 = empty slot)
SCENES = {
    "a": (1, 2, BASE),
    "b": (1, 3, 0),
    "c": (2, 3, BASE),
    "d": (1, 0, 0),
    "e": (0, 2, 0),
    "f": (0, 0, 3),
    "g": (PERSON, 1, 0),
    "h": (2, 0, PERSON),
    "i": (PERSON, 3, BASE),
    "j": (4, BASE, 0),
    "k": (0, 4, 0),
    "l": (0, PERSON, 0),
}


def render(slots: tuple[int, ...], index: int) -> tuple[np.ndarray, np.ndarray]:
    """A 40x60 gray scene with one coloured rectangle per non-zero slot class."""
    image = np.full((H, W, 3), 100 + index, np.uint8)  # a per-image shade tells images apart
    label = np.zeros((H, W), np.uint8)
    for (rows, cols), c in zip(SLOTS, slots, strict=True):
        if c:
            band = (slice(rows.start - 1, rows.stop + 1), slice(cols.start - 1, cols.stop + 1))
            label[band] = IGNORE_INDEX
            label[rows, cols], image[rows, cols] = c, COLOURS[c]
    return image, label


class FakeImages:
    """In-memory LabelledImages over ``scenes``; records every load."""

    def __init__(self, scenes: dict[str, tuple[int, ...]], classes: tuple[int, ...]) -> None:
        self.classes = classes
        self.data = {k: render(v, i) for i, (k, v) in enumerate(sorted(scenes.items()))}
        self.loads: list[str] = []

    def images_with(self, class_id: int) -> tuple[str, ...]:
        return tuple(k for k, (_, label) in sorted(self.data.items()) if (label == class_id).any())

    def load(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        self.loads.append(image_id)
        image, label = self.data[image_id]
        return image.copy(), label.copy()


def fake(classes: tuple[int, ...] = (1, 2, 3, 4, PERSON)) -> FakeImages:
    return FakeImages(SCENES, classes)


STRETCH = TestResize(S, mode="stretch")


def identify(images: FakeImages, image: torch.Tensor) -> str:
    """The id whose stretched image equals ``image`` (float32 [3, S, S])."""
    pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    hits = [k for k, v in images.data.items() if np.array_equal(STRETCH(*v)[0], pixels)]
    assert len(hits) == 1
    return hits[0]


def test_fake_is_labelled_images() -> None:
    assert isinstance(fake(), LabelledImages)


def test_shapes_dtypes_and_collate() -> None:
    ds = ImageEpisodes(fake(), way=2, shot=2, num_episodes=3, seed=0, transform=TrainAugment(S))
    item = ds[0]
    assert item["support_images"].shape == (2, 2, 3, S, S)
    assert item["support_images"].dtype == torch.float32
    assert item["support_masks"].shape == (2, 2, S, S)
    assert item["support_masks"].dtype == torch.uint8
    assert item["query_image"].shape == (3, S, S) and item["query_image"].dtype == torch.float32
    assert item["query_label"].shape == (S, S) and item["query_label"].dtype == torch.int64
    assert item["episode_classes"].shape == (2,) and item["episode_classes"].dtype == torch.int64
    assert 0.0 <= float(item["support_images"].min()) <= float(item["support_images"].max()) <= 1
    batch = default_collate([ds[1], ds[2]])
    assert batch["support_images"].shape == (2, 2, 2, 3, S, S)
    assert batch["support_masks"].shape == (2, 2, 2, S, S)
    assert batch["query_image"].shape == (2, 3, S, S)
    assert batch["query_label"].shape == (2, S, S) and batch["episode_classes"].shape == (2, 2)
    assert len(ds) == 3 and torch.equal(ds[-1]["query_label"], ds[2]["query_label"])


def test_episodes_depend_only_on_seed_and_index() -> None:
    def make(seed: int) -> ImageEpisodes:
        return ImageEpisodes(fake(), 2, 1, 6, seed, TrainAugment(S))

    first, second = make(4), make(4)
    later = second[5]
    for key, value in first[5].items():
        assert torch.equal(value, later[key]), key
    other = make(5)[5]
    assert any(not torch.equal(first[5][k], other[k]) for k in later)


def test_supports_and_query_are_distinct_and_labels_remapped() -> None:
    images = fake()
    ds = ImageEpisodes(images, way=2, shot=2, num_episodes=12, seed=1, transform=STRETCH)
    for index in range(len(ds)):
        item = ds[index]
        classes = item["episode_classes"].tolist()
        assert len(set(classes)) == 2 and set(classes) <= set(images.classes)
        query_id = identify(images, item["query_image"])
        raw_query = STRETCH(*images.data[query_id])[1]
        assert any(query_id in images.images_with(c) for c in classes)
        expected = np.zeros((S, S), np.int64)  # every other class (incl. BASE) -> background
        expected[raw_query == IGNORE_INDEX] = IGNORE_INDEX
        for j, c in enumerate(classes):
            expected[raw_query == c] = j + 1
        assert np.array_equal(item["query_label"].numpy(), expected)
        assert set(item["query_label"].unique().tolist()) & {1, 2}  # >= 1 episode class
        for n, c in enumerate(classes):
            ids = [identify(images, item["support_images"][n, k]) for k in range(2)]
            assert len(set(ids)) == 2 and query_id not in ids
            for k, image_id in enumerate(ids):
                raw = STRETCH(*images.data[image_id])[1]
                mask = item["support_masks"][n, k].numpy()
                assert set(np.unique(mask)) <= {0, 1, IGNORE_INDEX}
                assert np.array_equal(mask == 1, raw == c) and (mask == 1).any()
                assert np.array_equal(mask == IGNORE_INDEX, raw == IGNORE_INDEX)


def test_panet_fixed_classes_and_query_classes_by_cooccurrence() -> None:
    ds = ImageEpisodes(fake(), 2, 1, 30, 2, STRETCH, fixed_classes=(PERSON,))
    counts = set()
    for index in range(len(ds)):
        item = ds[index]
        assert PERSON in item["episode_classes"].tolist()
        counts.add(len(set(item["query_label"].unique().tolist()) & {1, 2}))
    assert counts == {1, 2}  # one or both classes, by co-occurrence only


# Each person pair is held by at least two images, so a 1-shot episode finds a support that holds
# both classes besides its query: (1, P) g m q, (2, P) h n p, (3, P) i o; (1, 2) a, (1, 3) b and
# (2, 3) c are held by one image each.
METASEG_SCENES = SCENES | {
    "m": (PERSON, 0, 1),
    "n": (0, 2, PERSON),
    "o": (3, 0, PERSON),
    "p": (PERSON, 2, 0),
    "q": (1, PERSON, 0),
}


def metaseg_fake() -> FakeImages:
    return FakeImages(METASEG_SCENES, (1, 2, 3, 4, PERSON))


def test_metaseg_query_holds_all_classes_and_person() -> None:
    ds = ImageEpisodes(
        metaseg_fake(), 2, 1, 20, 3, TrainAugment(S), "metaseg", fixed_classes=(PERSON,)
    )
    assert ds.combinations == ((1, PERSON), (2, PERSON), (3, PERSON))
    person_slots = set()
    for index in range(len(ds)):
        item = ds[index]
        classes = item["episode_classes"].tolist()
        assert PERSON in classes
        person_slots.add(classes.index(PERSON))
        assert {1, 2} <= set(item["query_label"].unique().tolist())
    assert person_slots == {0, 1}  # the way order is random
    assert "metaseg 2-way 1-shot" in ds.describe() and "all 2" in ds.describe()


def test_metaseg_supports_hold_every_episode_class_too() -> None:
    """MetaSeg builds the support AND the query sets from images holding person and the other
    class; each support mask stays binary for its own class. Under PANet's protocol the
    supports of the same classes come from their own lists (images without person too)."""
    images = metaseg_fake()
    holders = {k for k, v in METASEG_SCENES.items() if PERSON in v}
    for protocol, supports_seen in (("metaseg", set()), ("panet", set())):
        ds = ImageEpisodes(images, 2, 2, 12, 5, STRETCH, protocol, fixed_classes=(PERSON,))
        for index in range(len(ds)):
            item = ds[index]
            classes = item["episode_classes"].tolist()
            query = identify(images, item["query_image"])
            for way, c in enumerate(classes):
                for shot in range(2):
                    image_id = identify(images, item["support_images"][way, shot])
                    assert image_id != query
                    supports_seen.add(image_id)
                    mask = item["support_masks"][way, shot]
                    _, raw = STRETCH(*images.data[image_id])
                    assert set(mask.unique().tolist()) <= {0, 1, IGNORE_INDEX}
                    assert torch.equal(mask == 1, torch.from_numpy(raw == c))  # its own class
                    if protocol == "metaseg":
                        present = set(np.unique(raw).tolist())
                        assert set(classes) <= present, (image_id, classes)
        if protocol == "metaseg":
            assert supports_seen <= holders
        else:
            assert not supports_seen <= holders  # the constraint is what makes the difference
    # 2-shot: (3, P) has two images, fewer than a query + 2 supports: left out and named
    ds = ImageEpisodes(images, 2, 2, 1, 0, STRETCH, "metaseg", fixed_classes=(PERSON,))
    assert ds.combinations == ((1, PERSON), (2, PERSON))
    assert ds.short_combinations == {(3, PERSON): 2}
    assert "left out (images): {(3, 15): 2}" in ds.describe()


def test_metaseg_with_too_few_images_per_combination_is_a_typed_error() -> None:
    with pytest.raises(DatasetArgumentError, match=r"fewer than shot \+ 1 = 4 images"):
        ImageEpisodes(metaseg_fake(), 2, 3, 1, 0, STRETCH, "metaseg", fixed_classes=(PERSON,))


def test_metaseg_without_fixed_classes_uses_every_cooccurring_pair() -> None:
    ds = ImageEpisodes(metaseg_fake(), 2, 1, 4, 0, STRETCH, "metaseg")
    assert ds.combinations == ((1, PERSON), (2, PERSON), (3, PERSON))
    assert ds.short_combinations == {(1, 2): 1, (1, 3): 1, (2, 3): 1}  # one image each
    for index in range(len(ds)):
        assert {1, 2} <= set(ds[index]["query_label"].unique().tolist())


class HalfCrop:
    """Deterministic-by-rng transform: the left or right 32x32 window of rows 4..36."""

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        left = 0 if rng.random() < 0.5 else W - 32
        return image[4:36, left : left + 32].copy(), label[4:36, left : left + 32].copy()


def test_support_redrawn_when_its_class_is_cropped_away() -> None:
    # Each half crop removes slot 0 or slot 2, so many draws lose their class.
    images = fake()
    ds = ImageEpisodes(images, 2, 2, 10, 7, HalfCrop())
    for index in range(len(ds)):
        item = ds[index]
        masks = item["support_masks"]
        assert all((masks[n, k] == 1).any() for n in range(2) for k in range(2))
        assert set(item["query_label"].unique().tolist()) & {1, 2}
    assert len(images.loads) > 10 * 5  # re-draws happened beyond the 5 images per episode


def test_vanishing_support_class_raises_after_bounded_retries() -> None:
    # Class 3 sits only in slot 2 and class 1 only in slot 0: a left crop never shows class 3.
    scenes = {"p": (1, 0, 0), "q": (1, 0, 0), "r": (0, 0, 3), "s": (0, 0, 3)}

    def left(image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        return image[4:36, :32].copy(), label[4:36, :32].copy()

    ds = ImageEpisodes(FakeImages(scenes, (1, 3)), 2, 1, 1, 0, left)
    with pytest.raises(RuntimeError, match="no support image of class 3 kept the class"):
        ds[0]
    one_way = ImageEpisodes(FakeImages(scenes, (3,)), 1, 1, 1, 0, left)
    with pytest.raises(RuntimeError, match="no query kept any of the episode classes"):
        one_way[0]


def test_feature_size_redraws_tiny_supports() -> None:
    # Class 1 covers a 32x16 block of the 32x32 crop; at feature size 1 it is half a cell.
    def left(image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        return image[4:36, :32].copy(), label[4:36, :32].copy()

    scenes = {"p": (1, 0, 0), "q": (1, 0, 0)}
    assert ImageEpisodes(FakeImages(scenes, (1,)), 1, 1, 1, 0, left, feature_size=4)[0]
    with pytest.raises(RuntimeError, match=r"feature size 1"):
        ImageEpisodes(FakeImages(scenes, (1,)), 1, 1, 1, 0, left, feature_size=1)[0]


def test_describe_names_the_protocol() -> None:
    line = ImageEpisodes(fake(), 2, 1, 1000, 1234, STRETCH).describe()
    assert "\n" not in line
    assert line.startswith("panet 2-way 1-shot, 1000 episodes (seed 1234)")
    assert "1..2 episode classes" in line and "TestResize(size=32, mode='stretch')" in line


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(way=0), "way must be >= 1"),
        (dict(shot=0), "shot must be >= 1"),
        (dict(protocol="oslsm"), "protocol must be one of"),
        (dict(num_episodes=-1), "num_episodes must be >= 0"),
        (dict(seed=-2), "seed must be >= 0"),
        (dict(feature_size=0), "feature_size must be >= 1"),
        (dict(fixed_classes=(7,)), r"fixed_classes \[7\] are not among images.classes"),
        (dict(fixed_classes=(1, 1)), "fixed_classes has duplicates"),
        (dict(way=1, fixed_classes=(1, 2)), "exceed way=1"),
        (dict(shot=3, fixed_classes=(4,)), r"fixed_classes \[4\] have fewer than shot \+ 1 = 4"),
        (dict(way=5, shot=2), r"way=5 exceeds the 4 classes .* short of images .*\{4: 2\}"),
        (dict(way=3, protocol="metaseg", fixed_classes=(PERSON,)), "metaseg: no image holds 3"),
    ],
)
def test_construction_errors(kwargs: dict, match: str) -> None:
    args = dict(way=2, shot=1, num_episodes=2, seed=0, transform=STRETCH) | kwargs
    with pytest.raises(ValueError, match=match):
        ImageEpisodes(fake(), **args)


def test_bad_classes_and_transform_outputs_raise() -> None:
    with pytest.raises(ValueError, match="images.classes must be distinct ids in 1..254"):
        ImageEpisodes(fake((1, 255)), 1, 1, 1, 0, STRETCH)
    ds = ImageEpisodes(fake(), 1, 1, 2, 0, lambda image, label, rng: (image, label))
    with pytest.raises(ValueError, match=r"transform must return square uint8"):
        ds[0]
    with pytest.raises(IndexError, match="episode 2 out of range"):
        ds[2]
    sizes = iter([S, S + 8] * 4)

    def varying(image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        return TestResize(next(sizes))(image, label)

    with pytest.raises(ValueError, match="transform returned several sizes"):
        ImageEpisodes(fake(), 1, 1, 1, 0, varying)[0]
