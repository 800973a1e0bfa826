"""Episode datasets by name: the one place that maps a ``DataConfig`` to a benchmark."""

from __future__ import annotations

from torch.utils.data import Dataset

from ..config import Config
from ..model.backbone import feature_size
from . import synthetic
from .episodes import synthetic_episodes

SPLITS = ("train", "test")


def novel_class_ids(config: Config) -> tuple[int, ...]:
    """The held-out (test) classes of the configured fold."""
    if config.data.dataset == "synthetic":
        return synthetic.novel_classes(config.data.fold)
    raise ValueError(f"unknown dataset {config.data.dataset!r}")


def build_episodes(config: Config, split: str, shot: int, num_episodes: int, seed: int) -> Dataset:
    """N-way K-shot episodes of the configured benchmark.

    ``split`` "train" draws from the fold's base classes, "test" from its novel classes; the
    way and image size come from the model config. Episodes are a pure function of ``seed``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if config.data.dataset == "synthetic":
        return synthetic_episodes(
            fold=config.data.fold,
            split=split,
            way=config.model.way,
            shot=shot,
            num_episodes=num_episodes,
            seed=seed,
            image_size=config.model.image_size,
            max_distractors=config.data.max_distractors,
            feature_size=feature_size(config.model.backbone, config.model.image_size),
        )
    raise ValueError(f"unknown dataset {config.data.dataset!r}")


def describe(config: Config) -> str:
    """One line that names the benchmark protocol, printed with every result."""
    if config.data.dataset == "synthetic":
        return (
            f"synthetic benchmark, fold {config.data.fold} (novel classes "
            f"{list(synthetic.novel_classes(config.data.fold))}), generated at "
            f"{config.model.image_size}x{config.model.image_size}, evaluated at network resolution; "
            f"queries hold 1..N episode classes (PANet multi-way), up to "
            f"{config.data.max_distractors} non-episode objects -> background; 255 ignored"
        )
    raise ValueError(f"unknown dataset {config.data.dataset!r}")
