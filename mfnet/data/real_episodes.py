"""N-way K-shot episodes over a collection of labelled real images (PASCAL-5i, COCO-20i).

Two protocols:

- "panet" (the paper's default, PANet/PPNet multi-way): ``way`` distinct classes among those with
  at least ``shot + 1`` images; the query is drawn from the image list of one episode class chosen
  uniformly, so it holds 1..N episode classes by co-occurrence; other classes become background.
- "metaseg" (MetaSeg [27], paper Table II: "images ... which contain person and another held-out
  class are sampled to construct support and query sets"): the query AND every support are
  drawn from the images that hold *all* N episode classes (each support mask stays binary for
  its own class); the query must still hold them all after the transform; ``fixed_classes=(15,)``
  forces person on PASCAL. Only class combinations held by at least ``shot + 1`` images (a query
  and ``shot`` supports besides it) are sampled; the others are named by ``describe``.

The query is drawn first and every support is then drawn from its class list without the query
image, so "query differs from every support" always holds with ``shot + 1`` images per class.
Support masks and query labels are computed after the transform; a support whose class vanished
(e.g. cropped away) and a query that lost its required classes are re-drawn, a bounded number of
times. Episode ``index`` depends only on ``np.random.default_rng([seed, index])``.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from typing import Protocol, cast, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset

from mfnet.data.episodes import episode_rng, pack_episode, query_label_lut, survives_pooling
from mfnet.data.errors import DatasetArgumentError
from mfnet.data.transforms import IGNORE_INDEX, TestResize

PROTOCOLS = ("panet", "metaseg")
MAX_DRAWS = 30  # re-draws of one support shot or of the query before giving up

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@runtime_checkable
class LabelledImages(Protocol):
    """A labelled image collection restricted to the classes an episode may sample."""

    classes: tuple[int, ...]  # the class ids this collection may sample (base or novel of a fold)

    def images_with(self, class_id: int) -> tuple[str, ...]:
        """Ids of the images that contain ``class_id`` (deterministic order)."""
        ...

    def load(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 [H, W, 3] RGB, label uint8 [H, W]: raw class ids, 0 bg, 255 ignore)."""
        ...


class ImageEpisodes(Dataset):
    """``num_episodes`` seeded N-way K-shot episodes over ``images``; item ``index`` is a dict:

    - ``support_images``: float32 [N, K, 3, S, S], RGB in [0, 1];
    - ``support_masks``: uint8 [N, K, S, S]; 1 on the way-n class, 255 ignore, 0 elsewhere;
    - ``query_image``: float32 [3, S, S], RGB in [0, 1];
    - ``query_label``: int64 [S, S]; j + 1 on the j-th episode class (0-based), 255 ignore,
      0 on background and every other class;
    - ``episode_classes``: int64 [N], the original class ids in way order;
    - with ``keep_original_label``: ``query_label_original`` int64 [H0, W0] (remapped like
      ``query_label``, at the image's own size) and ``query_content`` int64 [2], the (h, w) the
      image occupies at the top-left of the S x S input (batch these one episode at a time).

    S is the transform's output size; ``transform(image, label, rng)`` is applied to every
    support and query image with the episode's generator. ``fixed_classes`` are always episode
    classes; the way order is a random permutation, so a label index carries no class identity.
    ``feature_size`` (optional, as in ``EpisodeSpec``): also re-draw support shots whose mask
    covers less than one cell of a feature_size x feature_size map.
    """

    def __init__(
        self,
        images: LabelledImages,
        way: int,
        shot: int,
        num_episodes: int,
        seed: int,
        transform: Transform,
        protocol: str = "panet",
        fixed_classes: tuple[int, ...] = (),
        feature_size: int | None = None,
        keep_original_label: bool = False,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if way < 1:
            raise ValueError(f"way must be >= 1, got {way}")
        if shot < 1:
            raise ValueError(f"shot must be >= 1, got {shot}")
        if num_episodes < 0:
            raise ValueError(f"num_episodes must be >= 0, got {num_episodes}")
        if seed < 0:  # np.random.default_rng([seed, index]) takes non-negative entropy only
            raise ValueError(f"seed must be >= 0, got {seed}")
        if feature_size is not None and feature_size < 1:
            raise ValueError(f"feature_size must be >= 1, got {feature_size}")
        classes = tuple(operator.index(c) for c in images.classes)
        if any(not 1 <= c <= 254 for c in classes) or len(set(classes)) != len(classes):
            raise ValueError(f"images.classes must be distinct ids in 1..254, got {classes}")
        fixed = tuple(operator.index(c) for c in fixed_classes)
        if len(set(fixed)) != len(fixed):
            raise ValueError(f"fixed_classes has duplicates: {fixed}")
        if missing := [c for c in fixed if c not in classes]:
            raise ValueError(f"fixed_classes {missing} are not among images.classes {classes}")
        if len(fixed) > way:
            raise ValueError(f"{len(fixed)} fixed_classes {fixed} exceed way={way}")

        self.images = images
        self.way, self.shot = int(way), int(shot)
        self.num_episodes, self.seed = int(num_episodes), int(seed)
        self.transform = transform
        self.protocol = protocol
        self.fixed_classes = fixed
        self.feature_size = feature_size
        if keep_original_label and not hasattr(transform, "resized_shape"):
            raise ValueError(
                "keep_original_label needs a transform with resized_shape "
                "(TestResize): the prediction is mapped back through it"
            )
        self.keep_original_label = keep_original_label
        self.lists = {c: tuple(images.images_with(c)) for c in classes}
        # A class needs a query plus ``shot`` supports that differ from it.
        self.classes = tuple(c for c in classes if len(self.lists[c]) >= shot + 1)
        short = {c: len(self.lists[c]) for c in classes if c not in self.classes}
        if short_fixed := [c for c in fixed if c in short]:
            raise ValueError(
                f"fixed_classes {short_fixed} have fewer than shot + 1 = {shot + 1} images "
                f"(counts {short})"
            )
        if way > len(self.classes):
            raise ValueError(
                f"way={way} exceeds the {len(self.classes)} classes with at least shot + 1 = "
                f"{shot + 1} images {self.classes}; short of images (class: count): {short}"
            )
        # metaseg samples uniformly among the combinations that shot + 1 images hold entirely: the
        # same distribution as re-sampling combinations until one has an episode, but bounded.
        # image ids holding all classes of a combination: the query and support pool of metaseg
        held = self._cooccurring_combinations() if protocol == "metaseg" else {}
        if protocol == "metaseg" and not held:
            raise ValueError(
                f"metaseg: no image holds {way} of the classes {self.classes} at once"
                + (f" including the fixed classes {fixed}" if fixed else "")
                + "; no query can contain every episode class"
            )
        self.combination_images = {
            combo: ids for combo, ids in held.items() if len(ids) >= shot + 1
        }
        self.short_combinations = {
            combo: len(ids) for combo, ids in held.items() if len(ids) < shot + 1
        }
        self.combinations = tuple(sorted(self.combination_images))
        if protocol == "metaseg" and not self.combinations:
            raise DatasetArgumentError(
                f"metaseg {way}-way {shot}-shot: every class combination some image holds is "
                f"held by fewer than shot + 1 = {shot + 1} images (a query and {shot} supports "
                f"that each hold all {way} classes; images per combination: "
                f"{self.short_combinations}); lower --shot or --eval-shot"
            )

    def _cooccurring_combinations(self) -> dict[tuple[int, ...], tuple[str, ...]]:
        """Sorted class combinations (fixed classes included) that some image holds entirely ->
        the ids of the images that hold them (in the order of the class lists)."""
        held: dict[str, set[int]] = {}
        for c in self.classes:
            for image_id in self.lists[c]:
                held.setdefault(image_id, set()).add(c)
        fixed = set(self.fixed_classes)
        free = self.way - len(fixed)
        found: dict[tuple[int, ...], list[str]] = {}
        for image_id, present in held.items():
            if fixed <= present and len(present) >= self.way:
                for extra in itertools.combinations(sorted(present - fixed), free):
                    found.setdefault(tuple(sorted(fixed.union(extra))), []).append(image_id)
        return {combo: tuple(found[combo]) for combo in sorted(found)}

    def __len__(self) -> int:
        return self.num_episodes

    def describe(self) -> str:
        """One line naming the protocol, printed with results."""
        if self.protocol == "panet":
            query = (
                f"query drawn from one episode class's list, holds 1..{self.way} episode classes"
            )
        else:
            short = (
                f"; combinations with fewer than shot + 1 = {self.shot + 1} images left out "
                f"(images): {self.short_combinations}"
                if self.short_combinations
                else ""
            )
            query = (
                f"query and supports hold all {self.way} episode classes "
                f"({len(self.combinations)} co-occurring combinations{short})"
            )
        fixed = f", always including {list(self.fixed_classes)}" if self.fixed_classes else ""
        return (
            f"{self.protocol} {self.way}-way {self.shot}-shot, {self.num_episodes} episodes "
            f"(seed {self.seed}) over classes {list(self.classes)}{fixed}; {query}, other classes "
            f"-> background, 255 ignored; transform {self.transform!r}"
        )

    def _transformed(
        self, image_id: str, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.images.load(image_id)
        image, label = self.transform(image, label, rng)
        image, label = np.asarray(image), np.asarray(label)
        side = label.shape[0] if label.ndim == 2 else -1
        square = image.shape == (side, side, 3) and label.shape == (side, side)
        if not square or image.dtype != np.uint8 or label.dtype != np.uint8:
            raise ValueError(
                f"transform must return square uint8 image [S, S, 3] and label [S, S], got "
                f"{image.dtype} {image.shape} and {label.dtype} {label.shape} for {image_id!r}"
            )
        return image, label

    def _sample_classes(self, rng: np.random.Generator) -> list[int]:
        """The episode classes in way order (a random permutation)."""
        if self.protocol == "metaseg":
            chosen = list(self.combinations[int(rng.integers(len(self.combinations)))])
        else:
            fixed = list(self.fixed_classes)
            pool = [c for c in self.classes if c not in fixed]
            chosen = fixed + [int(c) for c in rng.choice(pool, self.way - len(fixed), False)]
        return [chosen[i] for i in rng.permutation(self.way)]

    def _draw_query(
        self, rng: np.random.Generator, classes: list[int]
    ) -> tuple[str, np.ndarray, np.ndarray]:
        """(image id, image uint8 [S, S, 3], raw label uint8 [S, S]) of the query; re-drawn while
        the transform removes every episode class ("panet") or any of them ("metaseg")."""
        if self.protocol == "metaseg":
            candidates: Sequence[str] = self.combination_images[tuple(sorted(classes))]
        for _ in range(MAX_DRAWS):
            if self.protocol == "panet":
                candidates = self.lists[classes[int(rng.integers(self.way))]]
            image_id = candidates[int(rng.integers(len(candidates)))]
            image, label = self._transformed(image_id, rng)
            present = np.bincount(label.ravel(), minlength=256)[classes] > 0
            if present.all() or (self.protocol == "panet" and present.any()):
                return image_id, image, label
        need = "all" if self.protocol == "metaseg" else "any"
        raise RuntimeError(
            f"no query kept {need} of the episode classes {classes} after the transform "
            f"{self.transform!r} in {MAX_DRAWS} draws"
        )

    def _draw_supports(
        self, rng: np.random.Generator, c: int, query_id: str, classes: list[int]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``shot`` distinct support images (uint8 [S, S, 3]) of class ``c`` other than the query,
        with their masks uint8 [S, S] in {0, 1, 255}; a shot whose class vanished is re-drawn.
        metaseg draws them from the images that hold every episode class ``classes``."""
        if self.protocol == "metaseg":
            pool: Sequence[str] = self.combination_images[tuple(sorted(classes))]
        else:
            pool = self.lists[c]
        free = [i for i in pool if i != query_id]
        if len(free) < self.shot:  # __init__ keeps only combinations with shot + 1 images
            raise DatasetArgumentError(
                f"{self.protocol}: only {len(free)} images besides the query can be supports of "
                f"class {c} in the episode {classes}; {self.shot}-shot needs {self.shot}"
            )
        images: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        used: set[str] = set()
        for _ in range(self.shot):
            # Each draw (and re-draw) is uniform over the unused images; a re-draw may bring the
            # same image back with a new augmentation, so one large object survives a crop.
            for _ in range(MAX_DRAWS):
                unused = [i for i in free if i not in used]
                image_id = unused[int(rng.integers(len(unused)))]
                image, label = self._transformed(image_id, rng)
                mask = (label == c).astype(np.uint8)
                mask[label == IGNORE_INDEX] = IGNORE_INDEX
                if survives_pooling(mask, self.feature_size):
                    break
            else:
                raise RuntimeError(
                    f"no support image of class {c} kept the class after the transform "
                    f"{self.transform!r} in {MAX_DRAWS} draws"
                    + (f" (feature size {self.feature_size})" if self.feature_size else "")
                )
            used.add(image_id)
            images.append(image)
            masks.append(mask)
        return images, masks

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Episode ``index`` (negative counts from the end), drawn from
        ``default_rng([seed, index])`` alone; see the class doc for the returned tensors."""
        rng = episode_rng(index, self.num_episodes, self.seed)
        classes = self._sample_classes(rng)
        query_id, query_image, query_raw = self._draw_query(rng, classes)
        support_images, support_masks = [], []
        for c in classes:
            images, masks = self._draw_supports(rng, c, query_id, classes)
            support_images += images
            support_masks += masks

        shapes = {m.shape for m in support_masks} | {query_raw.shape}
        if len(shapes) != 1:
            raise ValueError(f"transform returned several sizes {sorted(shapes)}; need one S")
        episode = pack_episode(
            classes, self.shot, support_images, support_masks, query_image, query_raw
        )
        if self.keep_original_label:  # evaluation at the original resolution (PFENet)
            _, original = self.images.load(query_id)
            lut = query_label_lut(classes)
            episode["query_label_original"] = torch.from_numpy(lut[original])  # [H0, W0]
            # __init__ refused a transform without resized_shape (a TestResize)
            test_resize = cast(TestResize, self.transform)
            content = test_resize.resized_shape(*original.shape)  # (h, w) inside [S, S]
            episode["query_content"] = torch.tensor(content, dtype=torch.int64)
        return episode
