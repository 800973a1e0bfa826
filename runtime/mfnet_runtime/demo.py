"""``python -m mfnet_runtime demo --out DIR``: inputs to try the runtime on, without torch.

Writes, from a fixed seed:

- ``DIR/support/``: a support SPEC (``docs/support_spec.md``, folder form) with one shot per
  class and ``classes.txt``;
- ``DIR/images/``: query images holding one or both classes on a cluttered background;
- ``DIR/video.mp4``: a short clip of the classes' objects moving (OpenCV); without OpenCV the
  clip's frames go to ``DIR/video_frames/`` instead, and the command says so.

The objects wear the looks of the embedded synthetic benchmark's novel classes of fold 0
(ids 1..5: stripes, checkerboard, dots, rings, waves), which a checkpoint trained with the
default ``python -m mfnet.train`` (fold 0) has never seen and segments from the support shots.
The looks' parameters are copied by value from ``mfnet/data/synthetic.py`` (the runtime never
imports the training package); the drawing here is a small re-implementation of the same
pattern families, not bit-identical to the training generator.
"""

from __future__ import annotations

import colorsys
import math
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import RuntimeInputError, reexport_hint

DEFAULT_CLASSES = ("dots", "checker")  # the default checkpoint is 2-way
# The export is the training package's (torch, onnx): its ``export`` extra, from the checkout.
EXPORT_INSTALL = "pip install -e '.[export]'"


@dataclass(frozen=True)
class Look:
    """One class's appearance: pattern family, hue of its two colours, frequency in cycles per
    image side, orientation in degrees (the synthetic benchmark's ``ClassStyle``)."""

    class_id: int
    family: str
    hue: float
    frequency: float
    orientation: float

    @property
    def colours(self) -> tuple[np.ndarray, np.ndarray]:
        """The bright, saturated colour and the dark one, RGB floats in [0, 1]."""
        bright = colorsys.hsv_to_rgb(self.hue, 0.75, 0.92)
        dark = colorsys.hsv_to_rgb((self.hue + 0.08) % 1.0, 0.7, 0.32)
        return np.array(bright, np.float32), np.array(dark, np.float32)


# Fold 0's novel classes of the synthetic benchmark, by value: family = FAMILIES[(id - 1) % 5],
# hue = (7 (id - 1) mod 20) / 20, frequency level = (id - 1) mod 4 of (5, 7, 9.5, 12.5),
# orientation = 47 (id - 1) mod 180.
LOOKS: dict[str, Look] = {
    "stripes": Look(1, "stripes", 0.00, 5.0, 0.0),
    "checker": Look(2, "checker", 0.35, 7.0, 47.0),
    "dots": Look(3, "dots", 0.70, 9.5, 94.0),
    "rings": Look(4, "rings", 0.05, 12.5, 141.0),
    "waves": Look(5, "waves", 0.40, 5.0, 8.0),
}


def _pattern(
    look: Look, u: np.ndarray, v: np.ndarray, frequency: float, phase: tuple[float, float]
) -> np.ndarray:
    """Pattern value in [0, 1] (0 = bright colour, 1 = dark) at rotated coordinates u, v
    (image-side units, object-centred)."""
    w = 2 * math.pi * frequency
    if look.family == "stripes":
        t = np.sin(w * u + phase[0])
    elif look.family == "checker":
        t = 2.0 * np.sin(w * u + phase[0]) * np.sin(w * v + phase[1])
    elif look.family == "dots":  # round dots on a square lattice
        du = (frequency * u + phase[0] / (2 * math.pi)) % 1.0 - 0.5
        dv = (frequency * v + phase[1] / (2 * math.pi)) % 1.0 - 0.5
        t = (0.28 - np.sqrt(du * du + dv * dv)) * 8.0
    elif look.family == "rings":
        t = np.sin(w * np.sqrt(u * u + v * v) + phase[0])
    else:  # waves: stripes displaced sideways by a slower sinusoid
        t = np.sin(w * (u + 0.3 / frequency * np.sin(0.5 * w * v + phase[1])) + phase[0])
    return np.clip(0.5 + 1.5 * t, 0.0, 1.0)  # crisp two-colour pattern, slight antialiasing


@dataclass(frozen=True)
class _Object:
    """An ellipse of one class: centre and radii in image-side units, its texture's jitter."""

    name: str
    centre: tuple[float, float]
    radii: tuple[float, float]
    angle: float
    frequency: float
    orientation: float
    phase: tuple[float, float]
    scale: float  # brightness jitter

    def moved(self, dy: float, dx: float) -> _Object:
        return _Object(
            self.name,
            (self.centre[0] + dy, self.centre[1] + dx),
            self.radii,
            self.angle,
            self.frequency,
            self.orientation,
            self.phase,
            self.scale,
        )


def _random_object(rng: np.random.Generator, name: str, centre: tuple[float, float]) -> _Object:
    look = LOOKS[name]
    radius = rng.uniform(0.3, 0.45) / 2  # diameters as the benchmark's present objects
    return _Object(
        name,
        centre,
        (radius, radius * rng.uniform(0.65, 1.0)),
        rng.uniform(0.0, math.pi),
        look.frequency * rng.uniform(0.9, 1.1),
        look.orientation + rng.uniform(-25.0, 25.0),
        (rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)),
        rng.uniform(0.85, 1.1),
    )


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32 [H, W, 3] in [0, 1]: a smooth, muted colour field with value noise (never a
    class pattern)."""
    grid = np.stack(
        [rng.random((3, 3)), rng.uniform(0.05, 0.45, (3, 3)), rng.uniform(0.25, 0.85, (3, 3))], -1
    )
    rgb = np.array([colorsys.hsv_to_rgb(*p) for p in grid.reshape(-1, 3)], np.float32)
    field = Image.fromarray((rgb.reshape(3, 3, 3) * 255).astype(np.uint8))
    image = np.asarray(field.resize((width, height), Image.Resampling.BILINEAR), np.float32)
    noise_field = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8))
    noise = np.asarray(noise_field.resize((width, height), Image.Resampling.BILINEAR), np.float32)
    return np.clip((image / 255.0) * (0.8 + 0.4 * noise[..., None] / 255.0), 0.0, 1.0)


def render(
    background: np.ndarray, objects: list[_Object], rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Paint ``objects`` in order over ``background`` (float32 [H, W, 3]).

    Returns the image uint8 [H, W, 3] RGB and each class's visible mask uint8 [H, W] {0, 1}
    (later objects occlude earlier ones). Coordinates are in units of the longer side.
    """
    height, width = background.shape[:2]
    side = max(height, width)
    y = ((np.arange(height, dtype=np.float32) + 0.5) / side)[:, None]
    x = ((np.arange(width, dtype=np.float32) + 0.5) / side)[None, :]
    image = background.copy()
    masks = {obj.name: np.zeros((height, width), np.uint8) for obj in objects}
    for obj in objects:
        cy, cx = obj.centre
        cos, sin = math.cos(obj.angle), math.sin(obj.angle)
        a = (x - cx) * cos + (y - cy) * sin
        b = -(x - cx) * sin + (y - cy) * cos
        inside = (a / obj.radii[0]) ** 2 + (b / obj.radii[1]) ** 2 <= 1.0  # [H, W]
        theta = math.radians(obj.orientation)
        u = (x - cx) * math.cos(theta) + (y - cy) * math.sin(theta)
        v = -(x - cx) * math.sin(theta) + (y - cy) * math.cos(theta)
        bright, dark = LOOKS[obj.name].colours
        t = _pattern(LOOKS[obj.name], u, v, obj.frequency, obj.phase)[..., None]
        texture = np.clip((bright + (dark - bright) * t) * obj.scale, 0.0, 1.0)
        image[inside] = texture[inside]
        for mask in masks.values():
            mask[inside] = 0
        masks[obj.name][inside] = 1
    image = image * 255.0 + rng.integers(-3, 4, image.shape)  # mild sensor noise
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), masks


def scene(
    rng: np.random.Generator,
    names: tuple[str, ...],
    height: int,
    width: int,
) -> tuple[np.ndarray, dict[str, np.ndarray], list[_Object], np.ndarray]:
    """One image with one object per class in ``names``, spread over the frame."""
    side = max(height, width)
    spots = [(0.3, 0.3), (0.62, 0.68), (0.3, 0.75), (0.68, 0.3)]
    order = rng.permutation(len(spots))
    objects = []
    for name, spot in zip(names, order, strict=False):
        cy, cx = spots[spot]
        centre = (
            cy * height / side + rng.uniform(-0.04, 0.04),
            cx * width / side + rng.uniform(-0.04, 0.04),
        )
        objects.append(_random_object(rng, name, centre))
    background = _background(rng, height, width)
    image, masks = render(background, objects, rng)
    return image, masks, objects, background


def query_scene(
    rng: np.random.Generator, classes: tuple[str, ...], index: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """The demo's query image number ``index``: all ``classes``, or one of them every third image.

    Returns the image uint8 [H, W, 3] RGB and its ground truth uint8 [H, W] (0 = background,
    n = ``classes[n - 1]``), the labels a segmenter given the demo's support set should give.
    """
    present = classes if index % 3 != 2 else (classes[index % len(classes)],)
    image, masks, _, _ = scene(rng, present, height, width)
    truth = np.zeros((height, width), np.uint8)
    for label, name in enumerate(classes, start=1):
        if name in masks:
            truth[masks[name] == 1] = label
    return image, truth


@dataclass(frozen=True)
class DemoFiles:
    """What ``write_demo`` wrote."""

    support: Path
    images: Path
    video: Path  # a video file, or a folder of frames without OpenCV
    classes: tuple[str, ...]
    video_is_folder: bool


def write_demo(
    out: str | Path,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
    *,
    images: int = 6,
    frames: int = 48,
    size: tuple[int, int] = (144, 192),
    fps: float = 12.0,
    seed: int = 0,
    use_opencv: bool = True,
) -> DemoFiles:
    """Write the demo's support SPEC, query images and video under ``out``; deterministic.

    classes: names from ``LOOKS`` (as many as the model's way); size: (height, width) of the
    query images and video frames. Raises ``RuntimeInputError`` for unknown or repeated classes.
    """
    unknown = [name for name in classes if name not in LOOKS]
    if unknown or len(set(classes)) != len(classes) or not classes:
        raise RuntimeInputError(
            f"demo classes must be distinct names from {', '.join(LOOKS)}; "
            f"got {', '.join(classes) or 'none'}"
        )
    if len(classes) > 4:
        raise RuntimeInputError("the demo draws at most 4 classes per image")
    root = Path(out)
    rng = np.random.default_rng(seed)
    height, width = size
    support = root / "support"
    for name in classes:  # one shot per class, the object alone and large
        folder = support / name
        folder.mkdir(parents=True, exist_ok=True)
        image, masks, _, _ = scene(rng, (name,), 96, 96)
        Image.fromarray(image).save(folder / "shot.png")
        Image.fromarray(masks[name] * 255).save(folder / "shot.mask.png")
    (support / "classes.txt").write_text("".join(f"{name}\n" for name in classes))
    query_dir = root / "images"
    query_dir.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        image, _ = query_scene(rng, classes, i, height, width)
        Image.fromarray(image).save(query_dir / f"query{i:02d}.png")
    clip = _clip(rng, classes, frames, height, width)
    cv2: types.ModuleType | None = None
    if use_opencv:
        try:
            import cv2
        except ImportError:
            cv2 = None
    if cv2 is not None:
        video = root / "video.mp4"
        writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        if not writer.isOpened():
            raise RuntimeInputError(f"cannot write {video} (OpenCV's mp4v codec)")
        for frame in clip:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        return DemoFiles(support, query_dir, video, tuple(classes), False)
    video = root / "video_frames"
    video.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(clip):
        Image.fromarray(frame).save(video / f"frame{i:04d}.png")
    return DemoFiles(support, query_dir, video, tuple(classes), True)


def _clip(
    rng: np.random.Generator, classes: tuple[str, ...], frames: int, height: int, width: int
) -> list[np.ndarray]:
    """Frames of the classes' objects gliding over a fixed background (uint8 [H, W, 3])."""
    _, _, objects, background = scene(rng, classes, height, width)
    velocities = [(rng.uniform(-1, 1) * 0.004, rng.uniform(-1, 1) * 0.006) for _ in objects]
    clip = []
    for step in range(frames):
        swing = math.sin(2 * math.pi * step / max(frames, 1))  # there and back again
        moved = [
            obj.moved(vy * frames / 4 * swing, vx * frames / 4 * swing)
            for obj, (vy, vx) in zip(objects, velocities, strict=True)
        ]
        image, _ = render(background, moved, rng)
        clip.append(image)
    return clip


def next_commands(
    files: DemoFiles,
    checkpoint: str = "runs/synthetic-cpu/last.pt",
    engines: str = "engines/synthetic",
) -> list[str]:
    """The commands to run next: install the export (the training package with its ``export``
    extra: torch, onnx), export the default checkpoint, segment the video."""
    output = (
        files.video.parent / "segmented.mp4"
        if not files.video_is_folder
        else files.video.parent / "segmented"
    )
    return [
        f"{EXPORT_INSTALL}  # once, in the mfnet checkout: the export needs torch and onnx",
        reexport_hint(engines, checkpoint),
        f"python -m mfnet_runtime segment --engines {engines} --support {files.support} "
        f"--input {files.video} --output {output}",
    ]
