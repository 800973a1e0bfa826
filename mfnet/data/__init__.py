"""Few-shot segmentation data: the synthetic benchmark and the N-way K-shot episode sampler."""

from __future__ import annotations

from mfnet.data.episodes import EpisodeDataset, EpisodeSpec, SceneSource, synthetic_episodes
from mfnet.data.synthetic import (
    IGNORE_INDEX,
    NUM_CLASSES,
    NUM_FOLDS,
    ClassStyle,
    SyntheticScenes,
    base_classes,
    class_style,
    novel_classes,
)

__all__ = [
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "NUM_FOLDS",
    "ClassStyle",
    "EpisodeDataset",
    "EpisodeSpec",
    "SceneSource",
    "SyntheticScenes",
    "base_classes",
    "class_style",
    "novel_classes",
    "synthetic_episodes",
]
