"""Embedded synthetic few-shot segmentation benchmark (a CPU stand-in for PASCAL-5i).

Twenty object classes (ids 1..20) are procedurally textured shapes on a cluttered background.
Label 0 is background and 255 marks a thin "ignore" band along every object boundary, as in VOC.
Four folds mirror PASCAL-5i: fold i holds out classes 5i+1..5i+5 as novel (test) classes and
trains on the other 15.

A class's appearance (pattern family, two colours, frequency, orientation) is a pure function of
its class id, see ``class_style``. Families are assigned round-robin, so every fold holds one class
of each of the five families (stripes, checkerboard, dots, rings, waves); hues follow a stride-7
permutation of 20 evenly spaced hues and frequencies a cyclic level shift, so no fold has a hue
or frequency range of its own. Every instance jitters its colours, brightness, pattern phase,
orientation (+-25 degrees) and frequency (+-10 %), so one example identifies a class without
allowing pixel-exact matching. The background is low-frequency colour fields plus blobs of
muted, unstructured value noise; it never uses a periodic class pattern.
"""

from __future__ import annotations

import colorsys
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NUM_CLASSES = 20
NUM_FOLDS = 4
IGNORE_INDEX = 255
FAMILIES = ("stripes", "checker", "dots", "rings", "waves")
# Cycles (or dots) per image side of the four frequency levels.
_FREQUENCIES = (5.0, 7.0, 9.5, 12.5)
# One painted object: class id, centre (row, col in image-side units), bounding box, bool mask.
_Object = tuple[int, tuple[float, float], tuple[slice, slice], np.ndarray]


def _check_fold(fold: int) -> None:
    if not (isinstance(fold, int) and 0 <= fold < NUM_FOLDS):
        raise ValueError(f"fold must be an int in 0..{NUM_FOLDS - 1}, got {fold!r}")


def novel_classes(fold: int) -> tuple[int, ...]:
    """Novel (test) class ids of ``fold`` (0..3): ``5 * fold + 1 .. 5 * fold + 5``."""
    _check_fold(fold)
    per_fold = NUM_CLASSES // NUM_FOLDS
    return tuple(range(per_fold * fold + 1, per_fold * (fold + 1) + 1))


def base_classes(fold: int) -> tuple[int, ...]:
    """Base (training) class ids of ``fold`` (0..3): the 15 ids in 1..20 not novel in ``fold``."""
    novel = set(novel_classes(fold))
    return tuple(c for c in range(1, NUM_CLASSES + 1) if c not in novel)


def check_class_ids(ids: Sequence[int], what: str) -> tuple[int, ...]:
    """Return ``ids`` as a tuple of ints, or raise ValueError if any is outside 1..NUM_CLASSES
    (TypeError for a non-integer)."""
    out = tuple(operator.index(c) for c in ids)
    bad = [c for c in out if not 1 <= c <= NUM_CLASSES]
    if bad:
        raise ValueError(f"{what}: class ids must be in 1..{NUM_CLASSES}, got {bad}")
    return out


@dataclass(frozen=True)
class ClassStyle:
    """Canonical appearance of one class.

    Colours are RGB floats in [0, 1]; ``colour_a`` is bright and saturated, ``colour_b`` dark, so
    two classes can never be the same pair with the roles swapped. ``frequency`` is in cycles
    per image side (resolution independent); ``orientation`` in degrees.
    """

    family: str
    colour_a: tuple[float, float, float]
    colour_b: tuple[float, float, float]
    hue: float
    frequency: float
    orientation: float


def class_style(class_id: int) -> ClassStyle:
    """The fixed appearance of ``class_id`` (1..20); depends on the id only, never on a seed."""
    (class_id,) = check_class_ids([class_id], "class_style")
    k = class_id - 1
    # Round-robin families: every block of 5 ids (= one fold) has one class of each family.
    family_index, block = k % len(FAMILIES), k // len(FAMILIES)
    # Stride 7 is coprime to 20: same-family classes end up 0.25 apart on the hue circle and
    # each fold spreads over the whole circle.
    hue = ((7 * k) % NUM_CLASSES) / NUM_CLASSES
    # Cyclic level shift: same-family classes get four different frequencies.
    level = (block + family_index) % len(_FREQUENCIES)
    return ClassStyle(
        family=FAMILIES[family_index],
        colour_a=colorsys.hsv_to_rgb(hue, 0.75, 0.92),
        colour_b=colorsys.hsv_to_rgb((hue + 0.08) % 1.0, 0.7, 0.32),
        hue=hue,
        frequency=_FREQUENCIES[level],
        orientation=float((47 * k) % 180),
    )


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] float32 matrix of 1-D linear interpolation from n_in to n_out samples."""
    pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1))
    i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 2)
    frac = (pos - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    m[rows, i0] = 1.0 - frac
    m[rows, i0 + 1] += frac
    return m


def boundary_band(label: np.ndarray, width: int) -> np.ndarray:
    """Bool [H, W]: pixels within a band of ``width`` pixels around any label change.

    A pixel is in the band when its (lo + hi + 1)^2 window, lo + hi = width, is not constant;
    a straight edge therefore gets a band exactly ``width`` pixels wide. Separable max/min
    filters built from shifted views; the image border is not an edge (edge padding).
    """
    h, w = label.shape
    lo, hi = width // 2, (width + 1) // 2
    p = np.pad(label, ((lo, hi), (lo, hi)), mode="edge")
    n = lo + hi + 1
    vmax, vmin = p[:h].copy(), p[:h].copy()
    for d in range(1, n):
        np.maximum(vmax, p[d : d + h], out=vmax)
        np.minimum(vmin, p[d : d + h], out=vmin)
    hmax, hmin = vmax[:, :w].copy(), vmin[:, :w].copy()
    for d in range(1, n):
        np.maximum(hmax, vmax[:, d : d + w], out=hmax)
        np.minimum(hmin, vmin[:, d : d + w], out=hmin)
    return hmax != hmin


class SyntheticScenes:
    """Renders seeded scenes of textured objects; satisfies ``episodes.SceneSource``.

    Args:
        image_size: side S of the square images, >= 32.
        min_visible_fraction: fraction of the S * S pixels every ``present`` class must keep
            (after occlusion and boundary bands) in a rendered scene.
        max_attempts: scenes redrawn at most this often before giving up with RuntimeError
            (a safety net; a typical scene needs 1-2 attempts).
    """

    def __init__(
        self, image_size: int = 128, *, min_visible_fraction: float = 0.02, max_attempts: int = 100
    ) -> None:
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        if not 0.0 <= min_visible_fraction <= 0.05:
            raise ValueError(f"min_visible_fraction must be in [0, 0.05]: {min_visible_fraction}")
        self.image_size = int(image_size)
        self.min_visible_fraction = float(min_visible_fraction)
        self.max_attempts = int(max_attempts)
        # VOC's 5-pixel band on ~500-pixel images, scaled to this resolution.
        self.band_width = max(1, round(self.image_size / 100))
        self.styles = {c: class_style(c) for c in range(1, NUM_CLASSES + 1)}
        # Pixel centres in image-side units, and bilinear upsampling matrices for noise grids.
        self._coords = (np.arange(self.image_size, dtype=np.float32) + 0.5) / self.image_size
        self._interp = {g: _interp_matrix(self.image_size, g) for g in range(2, 25)}

    def render(
        self, rng: np.random.Generator, present: Sequence[int], distractors: Sequence[int] = ()
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw one scene holding one object per class in ``present`` and ``distractors``.

        Args:
            rng: the only source of randomness; advanced by the call.
            present: non-empty class ids (1..20) that must be visible.
            distractors: class ids (1..20) that get one object each, visibility not guaranteed;
                all ids of ``present`` and ``distractors`` must be distinct.
        Returns:
            image: uint8 [S, S, 3], RGB.
            label: uint8 [S, S]; 0 background, a class id (1..20) per object pixel, 255 on the
                boundary bands. Every class of ``present`` covers at least
                ``min_visible_fraction`` of the pixels (scenes are redrawn until it does); the
                distractors may end up occluded. Objects are painted in random order.
        Deterministic given the state of ``rng``.
        """
        present = check_class_ids(present, "present")
        distractors = check_class_ids(distractors, "distractors")
        if not present:
            raise ValueError("present must name at least one class")
        if len(set(present + distractors)) != len(present) + len(distractors):
            raise ValueError(f"class ids must be distinct, got {present} and {distractors}")
        # The layout (shapes, labels) is cheap and alone decides visibility, so only it is
        # redrawn; textures and background are painted once the layout is accepted.
        min_pixels = self.min_visible_fraction * self.image_size**2
        for _ in range(self.max_attempts):
            label, objects = self._layout(rng, present, distractors)
            counts = np.bincount(label.ravel(), minlength=256)
            if all(counts[c] >= min_pixels for c in present):
                return self._paint(rng, objects), label
        raise RuntimeError(f"no scene kept {present} visible in {self.max_attempts} attempts")

    draw = render

    def _layout(
        self, rng: np.random.Generator, present: tuple[int, ...], distractors: tuple[int, ...]
    ) -> tuple[np.ndarray, list[_Object]]:
        """Label map (uint8 [S, S], with bands) and the objects in painting order; later
        objects occlude earlier ones."""
        s = self.image_size
        label = np.zeros((s, s), np.uint8)
        objects = []
        classes = present + distractors
        for i in rng.permutation(len(classes)):
            # Present objects are not drawn tiny: a 15 % ellipse cannot reach 2 % of the image.
            size = rng.uniform(0.22 if i < len(present) else 0.15, 0.45)
            centre = (rng.uniform(0.12, 0.88), rng.uniform(0.12, 0.88))
            box, mask = self._shape(rng, centre, size)
            label[box][mask] = classes[i]
            objects.append((classes[i], centre, box, mask))
        label[boundary_band(label, self.band_width)] = IGNORE_INDEX
        return label, objects

    def _paint(self, rng: np.random.Generator, objects: list[_Object]) -> np.ndarray:
        """Uint8 [S, S, 3] RGB image of the background with ``objects`` painted in order."""
        image = self._background(rng)
        for class_id, centre, box, mask in objects:
            texture = self._texture(rng, self.styles[class_id], box, centre)
            np.copyto(image[box], texture, where=mask[..., None])
        image *= 255.0
        image += rng.integers(-3, 4, size=image.shape, dtype=np.int16)  # mild sensor noise
        np.clip(image + 0.5, 0.0, 255.0, out=image)
        return image.astype(np.uint8)

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """Float32 [S, S, 3] in [0, 1]: smooth colour field plus muted noise blobs."""
        g = int(rng.integers(2, 5))
        field = _hsv_grid(rng, (g, g), sat=(0.05, 0.45), val=(0.25, 0.85))
        image = np.ascontiguousarray(self._upsample(field))
        for _ in range(int(rng.integers(2, 6))):
            centre = (rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0))
            box, mask = self._shape(rng, centre, rng.uniform(0.15, 0.5))
            # Two octaves of value noise (random grids, bilinearly upsampled): unstructured,
            # unlike the periodic class patterns.
            cells = int(rng.integers(3, 9))
            noise = 0.65 * self._upsample(rng.random((cells, cells, 1), dtype=np.float32), box)
            noise += 0.35 * self._upsample(rng.random((24, 24, 1), dtype=np.float32), box)
            c0, c1 = _hsv_grid(rng, (2,), sat=(0.0, 0.3), val=(0.2, 0.8))
            np.copyto(image[box], c0 + (c1 - c0) * noise, where=mask[..., None])
        return image

    def _upsample(
        self, grid: np.ndarray, box: tuple[slice, slice] = (slice(None), slice(None))
    ) -> np.ndarray:
        """Bilinear upsampling of a [g, g, C] grid (2 <= g <= 24) over the whole [S, S] image,
        evaluated on ``box`` only: float32 [h, w, C]."""
        g, _, c = grid.shape
        rows, cols = self._interp[g][box[0]], self._interp[g][box[1]]
        tmp = (rows @ grid.reshape(g, g * c).astype(np.float32)).reshape(-1, g, c)
        return np.tensordot(tmp, cols, axes=([1], [1])).transpose(0, 2, 1)  # one big matmul

    def _shape(
        self, rng: np.random.Generator, centre: tuple[float, float], size: float
    ) -> tuple[tuple[slice, slice], np.ndarray]:
        """A random ellipse, rotated rectangle or star-convex blob of diameter ~``size`` * S.

        Returns the clipped bounding box (row, col slices) and a bool mask of the box's shape.
        """
        s, radius = self.image_size, size / 2.0
        kind = int(rng.integers(3))
        angle = rng.uniform(0.0, math.pi)
        cy, cx = centre
        reach = radius * 1.45  # enclosing radius of every shape below
        y0, y1 = max(0, int((cy - reach) * s)), min(s, int(math.ceil((cy + reach) * s)))
        x0, x1 = max(0, int((cx - reach) * s)), min(s, int(math.ceil((cx + reach) * s)))
        y = self._coords[y0:y1, None] - cy
        x = self._coords[None, x0:x1] - cx
        u = x * math.cos(angle) + y * math.sin(angle)
        v = -x * math.sin(angle) + y * math.cos(angle)
        if kind == 0:  # ellipse
            b = radius * rng.uniform(0.5, 1.0)
            mask = (u / radius) ** 2 + (v / b) ** 2 <= 1.0
        elif kind == 1:  # rotated rectangle; half-diagonal stays within ``reach``
            b = radius * rng.uniform(0.45, 1.0)
            mask = (np.abs(u) <= radius) & (np.abs(v) <= b)
        else:  # star-convex blob: radius a smooth function of the polar angle
            phi = np.arctan2(v, u)
            r = np.full_like(phi, radius * 0.95)
            for j, amp in zip((2, 3, 4), rng.uniform(0.0, [0.22, 0.15, 0.1]).tolist(), strict=True):
                r += radius * amp * np.cos(j * phi + rng.uniform(0.0, 2 * math.pi))
            mask = u * u + v * v <= r * r
        return (slice(y0, y1), slice(x0, x1)), mask

    def _texture(
        self,
        rng: np.random.Generator,
        style: ClassStyle,
        box: tuple[slice, slice],
        centre: tuple[float, float],
    ) -> np.ndarray:
        """Float32 [h, w, 3] RGB in [0, 1]: an instance of ``style`` over ``box``, with the
        colour, brightness, phase, orientation and frequency jitter of the module doc."""
        hue_shift = rng.uniform(-0.02, 0.02)
        sat_scale, val_scale = rng.uniform(0.85, 1.1), rng.uniform(0.8, 1.15)
        colours = []
        for rgb in (style.colour_a, style.colour_b):
            h, sat, val = colorsys.rgb_to_hsv(*rgb)
            jittered = colorsys.hsv_to_rgb(
                (h + hue_shift) % 1.0, min(1.0, sat * sat_scale), min(1.0, val * val_scale)
            )
            colours.append(np.array(jittered, np.float32) + rng.normal(0.0, 0.03, 3))
        a, b = (np.clip(c, 0.0, 1.0).astype(np.float32) for c in colours)
        freq = style.frequency * rng.uniform(0.9, 1.1)
        theta = math.radians(style.orientation + rng.uniform(-25.0, 25.0))
        phase = rng.uniform(0.0, 2 * math.pi, size=2).tolist()  # floats keep maths float32
        y = self._coords[box[0], None] - centre[0]
        x = self._coords[None, box[1]] - centre[1]
        u = x * math.cos(theta) + y * math.sin(theta)
        v = -x * math.sin(theta) + y * math.cos(theta)
        w = 2 * math.pi * freq
        if style.family == "stripes":
            t = np.sin(w * u + phase[0])
        elif style.family == "checker":
            t = 2.0 * np.sin(w * u + phase[0]) * np.sin(w * v + phase[1])
        elif style.family == "dots":  # round dots on a square lattice
            du = (freq * u + phase[0] / (2 * math.pi)) % 1.0 - 0.5
            dv = (freq * v + phase[1] / (2 * math.pi)) % 1.0 - 0.5
            t = (0.28 - np.sqrt(du * du + dv * dv)) * 8.0
        elif style.family == "rings":  # concentric about a point near the object centre
            off = rng.uniform(-0.05, 0.05, size=2).tolist()
            t = np.sin(w * np.sqrt((u - off[0]) ** 2 + (v - off[1]) ** 2) + phase[0])
        else:  # waves: stripes displaced sideways by a slower sinusoid
            t = np.sin(w * (u + 0.3 / freq * np.sin(0.5 * w * v + phase[1])) + phase[0])
        # Steep ramp: crisp two-colour pattern with about two pixels of antialiasing.
        t = np.clip(0.5 + 1.5 * t, 0.0, 1.0)[..., None].astype(np.float32)
        return a + (b - a) * t


def _hsv_grid(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    sat: tuple[float, float],
    val: tuple[float, float],
) -> np.ndarray:
    """Float32 [*shape, 3] of random RGB colours with saturation/value drawn from the ranges."""
    hsv = np.stack(
        [rng.random(shape), rng.uniform(*sat, size=shape), rng.uniform(*val, size=shape)], -1
    )
    rgb = [colorsys.hsv_to_rgb(*p) for p in hsv.reshape(-1, 3)]
    return np.asarray(rgb, np.float32).reshape(*shape, 3)
