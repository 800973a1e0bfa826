"""Episode datasets by name: the one place that maps a ``Config`` to a benchmark."""

from __future__ import annotations

from ..config import Config
from ..model.backbone import feature_size
from . import coco, pascal, synthetic
from .episodes import EpisodeDataset, MixedWayEpisodes, synthetic_episodes
from .real_episodes import ImageEpisodes
from .transforms import TestResize, train_augment

SPLITS = ("train", "test")
PERSON = {"pascal": 15, "coco": 1}  # the fixed class of the MetaSeg setup


def novel_class_ids(config: Config) -> tuple[int, ...]:
    """The held-out (test) classes of the configured fold."""
    data = config.data
    if data.dataset == "synthetic":
        return synthetic.novel_classes(data.fold)
    if data.dataset == "pascal":
        return pascal.novel_classes(data.fold)
    return coco.coco_novel_classes(data.fold, data.fold_split)


def _real_images(config: Config, split: str):
    """The labelled-image collection of a real benchmark for a split ("train" | "test")."""
    data = config.data
    role = "train" if split == "train" else "test"
    use_train_images = split == "train" or data.test_source == "train"
    if data.dataset == "pascal":
        return pascal.PascalImages(
            data.data_root,
            "trainaug" if use_train_images else "val",
            data.fold,
            role,
            min_object_pixels=data.min_object_pixels,
            drop_novel_images=data.drop_novel_images and split == "train",
        )
    return coco.CocoImages(
        data.data_root,
        "train" if use_train_images else "val",
        data.fold,
        role,
        fold_split=data.fold_split,
        min_object_pixels=data.min_object_pixels,
    )


def build_episodes(
    config: Config, split: str, shot: int, num_episodes: int, seed: int, batch_group: int = 1
) -> EpisodeDataset | ImageEpisodes | MixedWayEpisodes:
    """N-way K-shot episodes of the configured benchmark.

    ``split`` "train" draws from the fold's base classes (with augmentation on real data),
    "test" from its novel classes (with the configured test resize, protocol and resolution).
    Episodes are a pure function of ``seed``. Support shots whose object would vanish at the
    network's feature resolution are re-drawn. A way-flexible model (``model.max_way``) trains
    on episodes of 1..max_way classes, one number per run of ``batch_group`` episodes (a
    global batch); it is tested on ``model.way`` classes like any model.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "train" and config.model.max_way:
        by_way = {
            n: _episodes(config.replace(way=n), split, shot, num_episodes, seed)
            for n in range(1, config.model.max_way + 1)
        }
        return MixedWayEpisodes(by_way, batch_group, seed)  # type: ignore[arg-type]
    return _episodes(config, split, shot, num_episodes, seed)


def _episodes(
    config: Config, split: str, shot: int, num_episodes: int, seed: int
) -> EpisodeDataset | ImageEpisodes:
    """``build_episodes`` for one number of classes, ``config.model.way``."""
    data, size = config.data, config.model.image_size
    side = feature_size(config.model.backbone, size)
    if data.dataset == "synthetic":
        return synthetic_episodes(
            fold=data.fold,
            split=split,
            way=config.model.way,
            shot=shot,
            num_episodes=num_episodes,
            seed=seed,
            image_size=size,
            max_distractors=data.max_distractors,
            feature_size=side,
        )
    images = _real_images(config, split)
    if split == "train":
        return ImageEpisodes(
            images,
            config.model.way,
            shot,
            num_episodes,
            seed,
            train_augment(data.augmentation, size, data.resize_to),
            feature_size=side,
        )
    fixed: tuple[int, ...] = ()
    if data.protocol == "metaseg":
        person = PERSON[data.dataset]
        if person not in images.classes:
            raise ValueError(
                f"the MetaSeg setup pairs person (class {person}) with another held-out class, "
                f"but person is not a novel class of {data.dataset} fold {data.fold}"
                + (" (use --fold 2: PASCAL-5^2)" if data.dataset == "pascal" else "")
            )
        fixed = (person,)
    return ImageEpisodes(
        images,
        config.model.way,
        shot,
        num_episodes,
        seed,
        TestResize(size, data.test_resize),
        protocol=data.protocol,
        fixed_classes=fixed,
        feature_size=side,
        keep_original_label=data.eval_resolution == "original",
    )


def describe(config: Config) -> str:
    """One line that names the benchmark and every protocol option, printed with results."""
    data, size = config.data, config.model.image_size
    if data.dataset == "synthetic":
        return (
            f"synthetic benchmark, fold {data.fold} (novel classes "
            f"{list(synthetic.novel_classes(data.fold))}), generated at {size}x{size}, "
            f"evaluated at network resolution; queries hold 1..N episode classes (PANet "
            f"multi-way), up to {data.max_distractors} non-episode objects -> background; "
            "255 ignored"
        )
    source = {
        "pascal": {"val": "VOC2012 val", "train": "trainaug (as PANet)"},
        "coco": {"val": "val2014", "train": "train2014 (as PANet)"},
    }[data.dataset]
    name = "PASCAL-5i" if data.dataset == "pascal" else f"COCO-20i split {data.fold_split}"
    return (
        f"{name}, fold {data.fold} (novel classes {list(novel_class_ids(config))}), test images "
        f"{source[data.test_source]}, small-object filter "
        f"{data.min_object_pixels or 'none'} px, training images with novel classes "
        f"{'dropped' if data.drop_novel_images else 'kept (novel -> background)'}, training "
        f"augmentation {data.augmentation}"
        + (f" (resized to {data.resize_to or size})" if data.augmentation == "paper" else "")
        + f", test resize "
        f"{data.test_resize} to {size}, scored at {data.eval_resolution} resolution, episodes "
        f"{data.protocol}; 255 ignored"
    )
