"""N-way K-shot episode sampling (the PANet multi-way protocol) over any ``SceneSource``.

An episode picks ``way`` distinct classes from a class pool. Each class gets ``shot`` support
images in which it is present (plus a few other pool classes as distractors, masked as
background). The query holds 1..``way`` of the episode classes, plus distractors drawn from the
pool classes *outside* the episode, which count as background. Episode ``index`` depends only on
``np.random.default_rng([seed, index])``, so it is identical in any worker and any order.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset

from mfnet.data.synthetic import IGNORE_INDEX, SyntheticScenes, base_classes, novel_classes
from mfnet.ops.masked_pooling import mask_area

SPLITS = ("train", "test")
MAX_SUPPORT_DRAWS = 50


@runtime_checkable
class SceneSource(Protocol):
    """Anything that draws labelled images on demand (synthetic scenes, PASCAL-5i, COCO-20i)."""

    def draw(
        self, rng: np.random.Generator, present: Sequence[int], distractors: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (image uint8 [H, W, 3] RGB, label uint8 [H, W]: 0 background, class ids, 255
        ignore) in which every class of ``present`` is visible; ``distractors`` may appear.
        Must be deterministic given the state of ``rng``. All images share one H, W."""
        ...


@dataclass(frozen=True)
class EpisodeSpec:
    """Shape of an episode: ``way`` classes from ``class_pool``, ``shot`` supports each, and at
    most ``max_distractors`` extra objects per image. Validated on construction."""

    way: int
    shot: int
    class_pool: tuple[int, ...]
    max_distractors: int = 2
    # Side of the network's feature maps: support shots whose object would vanish there (bilinear
    # mask weights summing to less than one feature cell) are re-drawn. None = no check.
    feature_size: int | None = None

    def __post_init__(self) -> None:
        pool = tuple(operator.index(c) for c in self.class_pool)
        object.__setattr__(self, "class_pool", pool)  # accept any sequence, store a tuple
        if len(set(pool)) != len(pool):
            raise ValueError(f"class_pool has duplicate classes: {pool}")
        # Labels are uint8 with 0 = background and 255 = ignore.
        if any(not 1 <= c <= 254 for c in pool):
            raise ValueError(f"class_pool ids must be in 1..254, got {pool}")
        if self.way < 1:
            raise ValueError(f"way must be >= 1, got {self.way}")
        if self.shot < 1:
            raise ValueError(f"shot must be >= 1, got {self.shot}")
        if self.way > len(pool):
            raise ValueError(f"way={self.way} exceeds the {len(pool)} classes of the pool {pool}")
        if self.max_distractors < 0:
            raise ValueError(f"max_distractors must be >= 0, got {self.max_distractors}")
        if self.feature_size is not None and self.feature_size < 1:
            raise ValueError(f"feature_size must be >= 1, got {self.feature_size}")


def _to_float_chw(images: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] RGB -> float32 [..., 3, H, W] in [0, 1] (the model normalises).

    Converted in numpy: on a busy CPU, torch's intra-op thread pool made these small per-image
    ops several times slower than the rendering itself.
    """
    out = np.moveaxis(images, -1, -3).astype(np.float32, order="C")
    out *= 1.0 / 255.0
    return torch.from_numpy(out)


def episode_rng(index: int, num_episodes: int, seed: int) -> np.random.Generator:
    """The generator of episode ``index`` (negative counts from the end): a function of
    (seed, index) alone, so an episode is the same in any worker and any order."""
    index = operator.index(index)
    if index < 0:
        index += num_episodes
    if not 0 <= index < num_episodes:
        raise IndexError(f"episode {index} out of range for {num_episodes} episodes")
    return np.random.default_rng([seed, index])


def survives_pooling(mask: np.ndarray, feature_size: int | None) -> bool:
    """Whether a support mask (uint8 [H, W], 1 = the class) keeps its object: any pixel, and with
    ``feature_size`` at least one feature cell of bilinear weight (the model's masked pooling
    would otherwise see nothing)."""
    foreground = mask == 1
    if not foreground.any():
        return False
    if feature_size is None:
        return True
    area = mask_area(torch.from_numpy(foreground)[None], (feature_size, feature_size))
    return float(area[0]) >= 1.0


def query_label_lut(classes: Sequence[int]) -> np.ndarray:
    """int64 [256] lookup table: the j-th episode class -> j + 1, 255 stays, the rest -> 0."""
    lut = np.zeros(256, np.int64)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    lut[list(classes)] = np.arange(1, len(classes) + 1)
    return lut


def pack_episode(
    classes: Sequence[int],
    shot: int,
    support_images: list[np.ndarray],
    support_masks: list[np.ndarray],
    query_image: np.ndarray,
    query_raw: np.ndarray,
) -> dict[str, torch.Tensor]:
    """Numpy episode parts -> the tensors of the episode dict (see ``EpisodeDataset``).

    support_images: N*K uint8 [H, W, 3] (way-major), support_masks: N*K uint8 [H, W] in
    {0, 1, 255}, query_image uint8 [H, W, 3], query_raw uint8 [H, W] with raw class ids.
    """
    way = len(classes)
    h, w = query_raw.shape
    return {
        "support_images": _to_float_chw(np.stack(support_images).reshape(way, shot, h, w, 3)),
        "support_masks": torch.from_numpy(np.stack(support_masks).reshape(way, shot, h, w)),
        "query_image": _to_float_chw(query_image),
        "query_label": torch.from_numpy(query_label_lut(classes)[query_raw]),
        "episode_classes": torch.tensor(list(classes), dtype=torch.int64),
    }


class EpisodeDataset(Dataset):
    """``num_episodes`` seeded episodes; item ``index`` is a dict of tensors:

    - ``support_images``: float32 [N, K, 3, H, W], RGB in [0, 1];
    - ``support_masks``: uint8 [N, K, H, W]; 1 on the way-n class, 0 elsewhere, 255 ignore;
    - ``query_image``: float32 [3, H, W], RGB in [0, 1];
    - ``query_label``: int64 [H, W]; j + 1 on the j-th episode class (0-based), 0 on background
      and on every other class, 255 ignore;
    - ``episode_classes``: int64 [N], the original class ids in way order.

    ``torch.utils.data.default_collate`` stacks items to a leading batch dimension B.
    """

    def __init__(self, source: SceneSource, spec: EpisodeSpec, num_episodes: int, seed: int):
        if num_episodes < 0:
            raise ValueError(f"num_episodes must be >= 0, got {num_episodes}")
        if seed < 0:  # np.random.default_rng([seed, index]) takes non-negative entropy only
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.source = source
        self.spec = spec
        self.num_episodes = int(num_episodes)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.num_episodes

    def _distractors(self, rng: np.random.Generator, candidates: list[int]) -> list[int]:
        """0..max_distractors classes drawn without replacement from ``candidates``."""
        most = min(self.spec.max_distractors, len(candidates))
        count = int(rng.integers(0, most + 1))
        return [int(c) for c in rng.choice(candidates, size=count, replace=False)] if count else []

    def _draw_support(
        self, rng: np.random.Generator, c: int, others: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """One support shot of class ``c``: image uint8 [H, W, 3], mask uint8 [H, W] in
        {0, 1, 255}; re-drawn while its object would vanish at ``spec.feature_size``."""
        for _ in range(MAX_SUPPORT_DRAWS):
            image, label = self.source.draw(rng, [c], self._distractors(rng, others))
            mask = (label == c).astype(np.uint8)
            mask[label == IGNORE_INDEX] = IGNORE_INDEX
            if survives_pooling(mask, self.spec.feature_size):
                return image, mask
        raise RuntimeError(
            f"no support image of class {c} kept a visible object at feature size "
            f"{self.spec.feature_size} in {MAX_SUPPORT_DRAWS} draws; use larger images"
        )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Episode ``index`` (negative counts from the end), drawn from
        ``default_rng([seed, index])`` alone; see the class doc for the returned tensors."""
        spec = self.spec
        rng = episode_rng(index, self.num_episodes, self.seed)
        pool = list(spec.class_pool)
        classes = [int(c) for c in rng.choice(pool, size=spec.way, replace=False)]

        support_images, support_masks = [], []
        for c in classes:
            others = [p for p in pool if p != c]
            for _ in range(spec.shot):
                image, mask = self._draw_support(rng, c, others)
                support_images.append(image)
                support_masks.append(mask)

        m = int(rng.integers(1, spec.way + 1))
        present = [classes[j] for j in sorted(rng.choice(spec.way, size=m, replace=False))]
        outside = [p for p in pool if p not in classes]
        image, label = self.source.draw(rng, present, self._distractors(rng, outside))
        return pack_episode(classes, spec.shot, support_images, support_masks, image, label)


class MixedWayEpisodes(Dataset):
    """Episodes of 1..Nmax classes for way-flexible training (``ModelConfig.max_way``).

    ``by_way[n]`` holds the n-way episodes (all of one length). Each run of ``group``
    consecutive indices (a global batch: batch size x processes, which ``shard_indices``
    deals out in order) takes one number of classes, drawn uniformly from ``by_way`` by
    ``default_rng([seed, index // group])``, so every batch stacks and every rank agrees.
    """

    def __init__(self, by_way: dict[int, Dataset], group: int, seed: int) -> None:
        lengths = {len(episodes) for episodes in by_way.values()}  # type: ignore[arg-type]
        if not by_way or len(lengths) != 1:
            raise ValueError(f"by_way needs datasets of one length, got {sorted(lengths)}")
        if group < 1 or seed < 0:
            raise ValueError(f"group must be >= 1 and seed >= 0, got {group}, {seed}")
        self.by_way = dict(sorted(by_way.items()))
        self.ways = tuple(self.by_way)
        self.group = group
        self.seed = seed
        self.num_episodes = lengths.pop()

    def __len__(self) -> int:
        return self.num_episodes

    def way_of(self, index: int) -> int:
        """The number of classes of episode ``index``."""
        draw = np.random.default_rng([self.seed, index // self.group]).integers(len(self.ways))
        return self.ways[int(draw)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += self.num_episodes
        return self.by_way[self.way_of(index)][index]


def synthetic_episodes(
    fold: int,
    split: str,
    way: int,
    shot: int,
    num_episodes: int,
    seed: int,
    image_size: int = 128,
    max_distractors: int = 2,
    feature_size: int | None = None,
) -> EpisodeDataset:
    """Episodes of the synthetic benchmark: split "train" samples the 15 base classes of
    ``fold``, "test" its 5 novel classes, so test classes never appear in training images."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pool = base_classes(fold) if split == "train" else novel_classes(fold)
    spec = EpisodeSpec(
        way=way,
        shot=shot,
        class_pool=pool,
        max_distractors=max_distractors,
        feature_size=feature_size,
    )
    return EpisodeDataset(SyntheticScenes(image_size), spec, num_episodes, seed)
