"""More (or fewer) classes than a decoder has slots: decode in groups, merge per pixel.

A decoder has N class slots. A support set of n classes that does not fit them (n > N, or
n != N on a fixed-N export) is split, in order, into G = ceil(n / N) groups of nearly equal
size. A way-flexible decoder masks the unused slots of a group; a fixed-N decoder has none, so
a group is filled up with the set's other classes (in order), and where there are too few
(n < N) with repeats. Each group is decoded with the same frames (one batched call), and the
G results are merged per pixel:

- class c gets, in each group that holds it, the probability of its slots there (summed over
  repeats), and keeps the largest over those groups;
- background keeps the lowest background probability of any group (the group most sure that
  one of its classes is there);
- the label is the largest of these n + 1 scores (ties: the lower label).

A pixel is therefore background where every group is surer of background than any class is
of itself, and otherwise takes the class its group is surest of. Filling with other classes
rather than repeats keeps a group's probability mass split between distinct classes (a class
repeated in k slots would collect k shares of it). Numpy only: the runtime and
``mfnet`` (evaluation, ``mfnet.predict``) share this one rule. docs/decisions.md ("Any number
of classes") reports what it costs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import RuntimeInputError

Group = tuple[int, ...]  # the class index of each slot filled, in slot order


def plan_groups(count: int, slots: int, fill: bool) -> list[Group]:
    """Split classes 0..count-1 into groups of at most ``slots`` (sizes differ by at most 1).

    ``fill`` (a fixed-N decoder, which has no empty slots): every group is padded to exactly
    ``slots`` with the other classes in order, then by repeats, e.g. 3 classes, 2 slots ->
    (0, 1), (2, 0); 1 class, 2 slots -> (0, 0).
    """
    if count < 1 or slots < 1:
        raise RuntimeInputError(f"need at least one class and one slot, got {count}, {slots}")
    groups = -(-count // slots)
    sizes = [count // groups + (g < count % groups) for g in range(groups)]
    plan, start = [], 0
    for size in sizes:
        members = tuple(range(start, start + size))
        if fill:
            others = [c for c in range(count) if c not in members]
            pool = list(members) + others  # every class once, the group's own first
            members = tuple(pool[j % len(pool)] for j in range(slots))
        plan.append(members)
        start += size
    return plan


def merge_groups(
    probabilities: np.ndarray, groups: Sequence[Group], count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge the groups' softmax outputs per pixel (the rule of the module docstring).

    probabilities: float [G, B, N+1, H, W], group g's decoder output (channel 0 background,
    channel j + 1 = slot j; slots beyond ``len(groups[g])`` are ignored; probabilities are
    >= 0, so 0 is "not in this group"). Returns labels uint8
    [B, H, W] (0 = background, c + 1 = class c) and the merged scores float32
    [B, count+1, H, W] whose argmax the labels are.
    """
    if probabilities.ndim != 5 or probabilities.shape[0] != len(groups):
        raise RuntimeInputError(
            f"probabilities must be [G={len(groups)}, B, N+1, H, W], got {probabilities.shape}"
        )
    _, batch, _, height, width = probabilities.shape
    merged = np.zeros((batch, count + 1, height, width), np.float32)
    merged[:, 0] = probabilities[:, :, 0].min(axis=0)
    for g, group in enumerate(groups):
        in_group = np.zeros((batch, count, height, width), np.float32)  # this group's view
        for slot, member in enumerate(group):
            in_group[:, member] += probabilities[g, :, slot + 1]
        held = sorted(set(group))
        merged[:, [c + 1 for c in held]] = np.maximum(
            merged[:, [c + 1 for c in held]], in_group[:, held]
        )
    return merged.argmax(axis=1).astype(np.uint8), merged
