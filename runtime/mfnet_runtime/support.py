"""Support sets: per-shot features and class prototypes, as data that can be edited and saved.

A ``SupportSet`` is immutable and needs no engine: it can be built, edited (``remove_class``,
``with_class``), written and read (``save`` / ``load``, ``to_bytes`` / ``from_bytes``) anywhere.
The operations that run engines are ``Segmenter``'s: ``encode_support``, ``add_shot`` (encodes
the new shot only and re-aggregates its class only, from the per-shot features kept here) and
``load_support`` (``load`` plus the engine check). A set records the ``engine_id`` of the
engines that encoded it: features from other weights are meaningless to a decoder, so a
segmenter refuses such a set instead of producing confident garbage.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes
from .errors import RuntimeInputError

FORMAT = "mfnet-support-v1"


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

    def __post_init__(self) -> None:
        names = tuple(self.class_names)
        features = tuple(np.array(f, dtype=np.float32) for f in self.shot_features)
        prototypes = np.array(self.prototypes, dtype=np.float32)
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise RuntimeInputError(f"class names must be distinct non-empty strings: {names}")
        channels = prototypes.shape[1] if prototypes.ndim == 2 else -1
        if (
            len(features) != len(names)
            or prototypes.shape != (len(names), channels)
            or any(f.ndim != 2 or f.shape[0] < 1 or f.shape[1] != channels for f in features)
        ):
            raise RuntimeInputError(
                f"inconsistent support set: {len(names)} names, features "
                f"{[f.shape for f in features]}, prototypes {prototypes.shape}"
            )
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
        classes = ", ".join(
            f"{n!r}: {k}" for n, k in zip(self.class_names, self.shot_counts, strict=True)
        )
        return f"SupportSet({{{classes}}}, engine_id={self.engine_id[:12]}...)"

    def _with(
        self, names: tuple[str, ...], features: tuple[np.ndarray, ...], prototypes: np.ndarray
    ) -> SupportSet:
        """A set of the same engines with these names, per-class features and prototypes."""
        return SupportSet(names, features, prototypes, self.engine_id)

    def with_class(self, name: str, shot_features: np.ndarray, prototype: np.ndarray) -> SupportSet:
        """A new set where class ``name`` has ``shot_features`` float32 [K, C] and ``prototype``
        float32 [C]; a new name is added at the end (label N + 1), the others keep theirs."""
        prototype = np.asarray(prototype, dtype=np.float32)[None]  # [1, C]
        if name not in self.class_names:
            return self._with(
                self.class_names + (name,),
                self.shot_features + (shot_features,),
                np.concatenate([self.prototypes, prototype]),
            )
        index = self.class_names.index(name)
        features = tuple(
            shot_features if i == index else f for i, f in enumerate(self.shot_features)
        )
        prototypes = self.prototypes.copy()
        prototypes[index] = prototype[0]
        return self._with(self.class_names, features, prototypes)

    def remove_class(self, name: str) -> SupportSet:
        """A new set without class ``name``; the labels of later classes move down by one."""
        if name not in self.class_names:
            raise RuntimeInputError(
                f"no class {name!r} in this support set (classes: {list(self.class_names)})"
            )
        index = self.class_names.index(name)
        keep = [i for i in range(len(self.class_names)) if i != index]
        return self._with(
            tuple(self.class_names[i] for i in keep),
            tuple(self.shot_features[i] for i in keep),
            self.prototypes[keep],
        )

    def to_bytes(self) -> bytes:
        """The set as a numpy .npz archive (no pickle): format, engine id, names, per-shot
        features, prototypes."""
        counts = np.array(self.shot_counts, dtype=np.int64)
        channels = self.prototypes.shape[1]
        features = (
            np.concatenate(self.shot_features)
            if self.shot_features
            else np.zeros((0, channels), np.float32)
        )
        buffer = io.BytesIO()
        np.savez(
            buffer,
            format=np.array(FORMAT),
            engine_id=np.array(self.engine_id),
            class_names=np.array(self.class_names, dtype=str).reshape(-1),
            shot_counts=counts,
            shot_features=features,
            prototypes=self.prototypes,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "the support set data") -> SupportSet:
        """Read what ``to_bytes`` wrote; ``source`` names the data in errors."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                if str(archive["format"]) != FORMAT:
                    raise RuntimeInputError(
                        f"{source} has format {str(archive['format'])!r}, expected {FORMAT!r}"
                    )
                counts = archive["shot_counts"].astype(np.int64)
                features = np.split(archive["shot_features"], np.cumsum(counts)[:-1])
                return cls(
                    tuple(str(n) for n in archive["class_names"]),
                    tuple(features) if len(counts) else (),
                    archive["prototypes"],
                    str(archive["engine_id"]),
                )
        except RuntimeInputError:
            raise
        except Exception as error:  # zip, npy and key errors alike: not a readable set
            raise RuntimeInputError(
                f"{source} is not a readable support set file ({type(error).__name__}: {error})"
            ) from error

    def save(self, path: str | Path) -> None:
        """Write the set to ``path`` (``to_bytes``), atomically."""
        atomic_write_bytes(Path(path), self.to_bytes(), durable=True)

    @classmethod
    def load(cls, path: str | Path) -> SupportSet:
        """Read a set written by ``save``, without any engine check
        (``Segmenter.load_support`` refuses a set encoded by other engines)."""
        path = Path(path)
        if not path.is_file():
            raise RuntimeInputError(f"support set file {path} does not exist")
        return cls.from_bytes(path.read_bytes(), source=str(path))
