"""Support sets: per-shot features and class prototypes, cached, edited and saved.

A ``SupportSet`` is immutable: ``add_shot`` and ``remove_class`` return new sets. It keeps the
per-shot features (masked global pooling of each support image), so adding a shot runs the
support encoder on that shot only and re-aggregates that class only. It also records the
``engine_id`` of the engines that encoded it: features from other weights are meaningless to a
decoder, so such a set is refused instead of producing confident garbage.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .atomic import atomic_write_bytes
from .errors import RuntimeInputError
from .images import ImageInput, as_image_array, as_mask_array, fit

if TYPE_CHECKING:
    from .segmenter import Segmenter

FORMAT = "mfnet-support-v1"
# The support encoder pools with sum(f * w) / max(sum(w), 1e-5): a mask whose weight at feature
# resolution does not exceed that floor would give a shrunken, meaningless prototype.
MIN_FEATURE_AREA = 1e-5


@dataclass(frozen=True, eq=False)
class SupportSet:
    """Encoded support classes, in label order (label n + 1 = ``class_names[n]``).

    class_names: one name per class. shot_features: per class float32 [K_n, C] (one row per
    support shot). prototypes: float32 [N, C], the aggregated class prototypes the decoder reads.
    engine_id: ``Segmenter.engine_id`` of the engines that encoded it.
    """

    class_names: tuple[str, ...]
    shot_features: tuple[np.ndarray, ...]
    prototypes: np.ndarray
    engine_id: str
    _segmenter: Segmenter | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        names = tuple(self.class_names)
        features = tuple(np.array(f, dtype=np.float32) for f in self.shot_features)
        prototypes = np.array(self.prototypes, dtype=np.float32)
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise RuntimeInputError(f"class names must be distinct non-empty strings: {names}")
        channels = prototypes.shape[1] if prototypes.ndim == 2 else -1
        if (len(features) != len(names) or prototypes.shape != (len(names), channels)
                or any(f.ndim != 2 or f.shape[0] < 1 or f.shape[1] != channels
                       for f in features)):
            raise RuntimeInputError(
                f"inconsistent support set: {len(names)} names, features "
                f"{[f.shape for f in features]}, prototypes {prototypes.shape}")
        for array in features + (prototypes,):
            array.setflags(write=False)  # the set is immutable, its arrays too
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "shot_features", features)
        object.__setattr__(self, "prototypes", prototypes)

    @property
    def shot_counts(self) -> tuple[int, ...]:
        """Shots per class (K_n)."""
        return tuple(f.shape[0] for f in self.shot_features)

    def __repr__(self) -> str:
        classes = ", ".join(f"{n!r}: {k}" for n, k in zip(self.class_names, self.shot_counts))
        return f"SupportSet({{{classes}}}, engine_id={self.engine_id[:12]}...)"

    def _with(self, names: tuple[str, ...], features: tuple[np.ndarray, ...],
              prototypes: np.ndarray) -> SupportSet:
        return SupportSet(names, features, prototypes, self.engine_id, self._segmenter)

    def add_shot(self, name: str, image: ImageInput, mask: Any, color: str = "rgb"
                 ) -> SupportSet:
        """A new set with one more shot of class ``name`` (a new name adds a class at the end).

        Only the new shot goes through the support encoder; only its class is re-aggregated.
        Needs the segmenter that made the set (``SupportSet.load(path, segmenter=...)`` for a
        loaded one). image: uint8 [H, W, 3] RGB (``color="bgr"`` for OpenCV) or a file path;
        mask: [H, W] bool / {0, 1} / {0, 255} / {0, 1, 255} or a file path.
        """
        segmenter = self._segmenter
        if segmenter is None:
            raise RuntimeInputError("this support set has no segmenter to encode shots with; "
                                    "load it with SupportSet.load(path, segmenter=...)")
        segmenter.check_engine(self)
        index = self.class_names.index(name) if name in self.class_names else None
        first = 0 if index is None else self.shot_counts[index]
        new = segmenter.encode_shots([(name, first, image, mask)], color)  # [1, C]
        if index is None:
            features = np.asarray(new)
            names, all_features = self.class_names + (name,), self.shot_features + (features,)
        else:
            features = np.concatenate([self.shot_features[index], new])
            names = self.class_names
            all_features = tuple(features if i == index else f
                                 for i, f in enumerate(self.shot_features))
        prototype = segmenter.aggregate([features])  # [1, C]
        if index is None:
            prototypes = np.concatenate([self.prototypes, prototype])
        else:
            prototypes = self.prototypes.copy()
            prototypes[index] = prototype[0]
        return self._with(names, all_features, prototypes)

    def remove_class(self, name: str) -> SupportSet:
        """A new set without class ``name``; the labels of later classes move down by one."""
        if name not in self.class_names:
            raise RuntimeInputError(f"no class {name!r} in this support set (classes: "
                                    f"{list(self.class_names)})")
        index = self.class_names.index(name)
        keep = [i for i in range(len(self.class_names)) if i != index]
        return self._with(tuple(self.class_names[i] for i in keep),
                          tuple(self.shot_features[i] for i in keep), self.prototypes[keep])

    def save(self, path: str | Path) -> None:
        """Write the set to ``path`` (numpy .npz, no pickle), atomically."""
        counts = np.array(self.shot_counts, dtype=np.int64)
        channels = self.prototypes.shape[1]
        features = (np.concatenate(self.shot_features) if self.shot_features
                    else np.zeros((0, channels), np.float32))
        buffer = io.BytesIO()
        np.savez(buffer, format=np.array(FORMAT), engine_id=np.array(self.engine_id),
                 class_names=np.array(self.class_names, dtype=str).reshape(-1),
                 shot_counts=counts, shot_features=features, prototypes=self.prototypes)
        atomic_write_bytes(Path(path), buffer.getvalue(), durable=True)

    @classmethod
    def load(cls, path: str | Path, segmenter: Segmenter | None = None) -> SupportSet:
        """Read a set written by ``save``. With ``segmenter``: refuse a set encoded by other
        engines, and let the loaded set encode new shots."""
        path = Path(path)
        if not path.is_file():
            raise RuntimeInputError(f"support set file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["format"]) != FORMAT:
                    raise RuntimeInputError(f"{path} has format {str(data['format'])!r}, "
                                            f"expected {FORMAT!r}")
                counts = data["shot_counts"].astype(np.int64)
                features = np.split(data["shot_features"], np.cumsum(counts)[:-1])
                support = cls(tuple(str(n) for n in data["class_names"]),
                              tuple(features) if len(counts) else (), data["prototypes"],
                              str(data["engine_id"]), segmenter)
        except RuntimeInputError:
            raise
        except Exception as error:  # zip, npy and key errors alike: not a readable set
            raise RuntimeInputError(f"{path} is not a readable support set file "
                                    f"({type(error).__name__}: {error})") from error
        if segmenter is not None:
            segmenter.check_engine(support, source=str(path))
        return support


def feature_side(backbone: str, size: int) -> int:
    """Side of the stride-8 feature map for a size x size input (as the backbones compute it:
    VGG's unpadded pools round down, the ResNets and the small trunk round up)."""
    if backbone == "vgg16_bn":
        return size // 8
    for _ in range(3):
        size = (size + 1) // 2
    return size


def _bilinear_weights(source: int, target: int) -> np.ndarray:
    """float64 [source]: total weight each source index gets when a length-``source`` signal is
    resized to ``target`` bilinearly with align_corners=True (the encoder's mask resize)."""
    if target == 1:
        positions = np.zeros(1)
    else:
        positions = np.arange(target) * (source - 1) / (target - 1)
    low = np.floor(positions).astype(np.int64)
    fraction = positions - low
    weights = np.zeros(source)
    np.add.at(weights, low, 1.0 - fraction)
    np.add.at(weights, np.minimum(low + 1, source - 1), fraction)
    return weights


def feature_area(foreground: np.ndarray, side: int) -> float:
    """Sum of the object's weights once the bool [S, S] mask is resized to side x side."""
    rows = _bilinear_weights(foreground.shape[0], side)
    cols = _bilinear_weights(foreground.shape[1], side)
    return float(rows @ foreground.astype(np.float64) @ cols)


def prepare_shot(image: ImageInput, mask: Any, size: int, mode: str, backbone: str,
                 color: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    """One support shot -> (uint8 [S, S, 3] RGB, uint8 [S, S] 0/1/255), checked.

    ``label`` names the shot in errors, e.g. "class 'cat', shot 2".
    """
    array, bgr = as_image_array(image, color, what=f"support image of {label}")
    labels = as_mask_array(mask, what=f"mask of {label}")
    if labels.shape != array.shape[:2]:
        raise RuntimeInputError(
            f"the mask of {label} is {labels.shape[0]}x{labels.shape[1]} but its image is "
            f"{array.shape[0]}x{array.shape[1]}; a mask must have its image's height and width")
    if not (labels == 1).any():
        raise RuntimeInputError(
            f"the mask of {label} is empty (no object pixel; ignore-only pixels do not count): "
            "mark the object with 1, 255 or True")
    fitted, _ = fit(array, size, mode, Image.Resampling.BILINEAR)
    fitted_mask, _ = fit(labels, size, mode, Image.Resampling.NEAREST)
    if bgr:
        fitted = np.ascontiguousarray(fitted[:, :, ::-1])
    side = feature_side(backbone, size)
    if not (fitted_mask == 1).any() or feature_area(fitted_mask == 1, side) <= MIN_FEATURE_AREA:
        raise RuntimeInputError(
            f"the object in the mask of {label} ({int((labels == 1).sum())} pixels) vanishes "
            f"after resizing to the network input {size}x{size} (feature map {side}x{side}): "
            "use a support image where the object is larger, or crop it tighter")
    return fitted, fitted_mask


def aggregate_prototypes(run: Callable[[np.ndarray, bool], np.ndarray],
                         features: list[np.ndarray], way: int, min_shots: int,
                         max_shots: int, names: list[str]) -> np.ndarray:
    """Per-class shot features [K_n, C] -> prototypes float32 [len(features), C].

    The aggregator graph takes [way, K, C] and treats each row on its own (A_S relates the
    shots of one class only), so classes are grouped by K and a group fills the rows, padded
    with copies of its first class. ``run(x, single)`` runs the aggregator (``single``: the
    K = 1 graph, used when the general one needs at least ``min_shots`` = 2 shots).
    """
    channels = features[0].shape[1] if features else 0
    prototypes = np.empty((len(features), channels), np.float32)
    groups: dict[int, list[int]] = defaultdict(list)
    for index, shots in enumerate(features):
        if shots.shape[0] > max_shots:
            raise RuntimeInputError(
                f"class {names[index]!r} has {shots.shape[0]} shots; the engines take at most "
                f"{max_shots} per class (an export limit: re-export with a larger --max-shots)")
        groups[shots.shape[0]].append(index)
    for shots, members in groups.items():
        single = shots < min_shots
        for start in range(0, len(members), way):
            chunk = members[start:start + way]
            rows = [features[i] for i in chunk] + [features[chunk[0]]] * (way - len(chunk))
            result = run(np.ascontiguousarray(np.stack(rows), dtype=np.float32), single)
            prototypes[chunk] = result[:len(chunk)]
    return prototypes
