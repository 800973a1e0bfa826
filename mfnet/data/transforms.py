"""Paired image/label transforms for real benchmarks (PASCAL-5i, COCO-20i), numpy + PIL only.

Every transform maps (image uint8 [H, W, 3] RGB, label uint8 [H, W] raw class ids, 0 background,
255 ignore) to a fixed-size pair (image uint8 [S, S, 3], label uint8 [S, S]) and draws its
randomness only from the ``np.random.Generator`` it is given, so an episode is reproducible from
its seed. Labels are only ever resampled with NEAREST and padded with 255, so the set of label
values after a transform is a subset of the values before, plus 255.

- ``TrainAugment``: random scale, rotation, Gaussian blur, mirror, random crop; ``train_augment``
  builds its two recipes: "pfenet" (PFENet's: scale 0.9-1.1 of the original image, blur) and
  "paper" (Sec. IV-B: "Input images are resized to 473 x 473. Random crop, rotation and mirror":
  a square resize first, no scale jitter, no blur).
- ``TestResize``: "pad" = PFENet test resizing (longer side to S, aspect kept, bottom/right padded);
  "stretch" = PANet (S x S, aspect ratio ignored). Its geometry is the runtime's
  (``mfnet_runtime.images.content_shape``), so exported engines fit frames as evaluation does.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from mfnet_runtime.images import content_shape

IGNORE_INDEX = 255
# ImageNet mean colour in 0..255, the fill PFENet uses for rotated and padded image borders.
MEAN_RGB = (124, 116, 104)  # round((0.485, 0.456, 0.406) * 255)
# cv2.GaussianBlur with a 5x5 kernel and sigma=0 picks sigma = 0.3 * ((5 - 1) / 2 - 1) + 0.8;
# PIL's GaussianBlur radius is that standard deviation.
PFENET_BLUR_SIGMA = 0.3 * ((5 - 1) * 0.5 - 1) + 0.8
RESIZE_MODES = ("pad", "stretch")
AUGMENTATIONS = ("paper", "pfenet")  # mfnet.config.AUGMENTATIONS


def check_pair(image: np.ndarray, label: np.ndarray) -> None:
    """Raise ValueError unless image is uint8 [H, W, 3] and label uint8 [H, W] of the same H, W."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if label.dtype != np.uint8 or label.shape != image.shape[:2]:
        raise ValueError(
            f"label must be uint8 [H, W] matching image {image.shape[:2]}, "
            f"got {label.dtype} {label.shape}"
        )


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    return int(size)


def _probability(name: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return float(p)


def _pad_centred(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad (as PFENet's Crop: half before, half after) to at least size x size; image with the
    mean colour, label with 255."""
    h, w = label.shape
    pad_h, pad_w = max(size - h, 0), max(size - w, 0)
    if pad_h == 0 and pad_w == 0:
        return image, label
    top, left = pad_h // 2, pad_w // 2
    canvas = np.empty((h + pad_h, w + pad_w, 3), np.uint8)
    canvas[:] = MEAN_RGB
    canvas[top : top + h, left : left + w] = image
    label_canvas = np.full((h + pad_h, w + pad_w), IGNORE_INDEX, np.uint8)
    label_canvas[top : top + h, left : left + w] = label
    return canvas, label_canvas


class TrainAugment:
    """PFENet training augmentation, applied independently to the query and to every support.

    In order: with ``resize_to``, stretch to resize_to x resize_to (aspect ratio ignored; image
    bilinear, label NEAREST); scale by a uniform factor in ``scale`` (image bilinear, label
    NEAREST); with probability ``rotate_p`` rotate about the centre by a uniform angle in
    [-rotate, rotate] degrees (image bilinear, borders filled with the ImageNet mean colour;
    label NEAREST, borders 255); with probability ``blur_p`` Gaussian-blur the image (sigma 1.1,
    PFENet's 5x5 kernel); with probability ``flip_p`` mirror horizontally; pad to at least
    size x size (mean colour / 255, centred) and crop a uniformly placed size x size window.

    ``__call__(image uint8 [H, W, 3], label uint8 [H, W], rng)`` returns
    (image uint8 [size, size, 3], label uint8 [size, size]).
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.9, 1.1),
        rotate: float = 10.0,
        blur_p: float = 0.5,
        flip_p: float = 0.5,
        rotate_p: float = 0.5,
        resize_to: int | None = None,
    ) -> None:
        self.size = _check_size(size)
        if resize_to is not None and _check_size(resize_to) < self.size:
            raise ValueError(
                f"resize_to ({resize_to}) must be at least the crop size {self.size}: the image "
                "is resized to it before the crop"
            )
        self.resize_to = resize_to
        lo, hi = (float(s) for s in scale)
        if not 0.0 < lo <= hi:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        if rotate < 0:
            raise ValueError(f"rotate must be >= 0 degrees, got {rotate}")
        self.scale = (lo, hi)
        self.rotate = float(rotate)
        self.blur_p = _probability("blur_p", blur_p)
        self.flip_p = _probability("flip_p", flip_p)
        self.rotate_p = _probability("rotate_p", rotate_p)

    def __repr__(self) -> str:
        resize = "" if self.resize_to is None else f", resize_to={self.resize_to}"
        return (
            f"TrainAugment(size={self.size}{resize}, scale={self.scale}, rotate={self.rotate}, "
            f"rotate_p={self.rotate_p}, blur_p={self.blur_p}, flip_p={self.flip_p})"
        )

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"TrainAugment needs a np.random.Generator, got {type(rng).__name__}")
        check_pair(image, label)
        # Draw every random number up front so the stream's use does not depend on image sizes.
        factor = rng.uniform(*self.scale)
        rotating = rng.random() < self.rotate_p
        angle = rng.uniform(-self.rotate, self.rotate)
        blurring = rng.random() < self.blur_p
        flipping = rng.random() < self.flip_p

        img, lab = Image.fromarray(image), Image.fromarray(label)
        if self.resize_to is not None and label.shape != (self.resize_to, self.resize_to):
            square = (self.resize_to, self.resize_to)
            img = img.resize(square, Image.Resampling.BILINEAR)
            lab = lab.resize(square, Image.Resampling.NEAREST)
        h, w = lab.height, lab.width
        new_w, new_h = max(1, round(w * factor)), max(1, round(h * factor))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
            lab = lab.resize((new_w, new_h), Image.Resampling.NEAREST)
        if rotating and angle != 0.0:
            # Same centre and output size for both, so image and label stay aligned.
            img = img.rotate(angle, Image.Resampling.BILINEAR, fillcolor=MEAN_RGB)
            lab = lab.rotate(angle, Image.Resampling.NEAREST, fillcolor=IGNORE_INDEX)
        if blurring:
            img = img.filter(ImageFilter.GaussianBlur(radius=PFENET_BLUR_SIGMA))
        out_image, out_label = np.asarray(img), np.asarray(lab)
        if flipping:
            out_image, out_label = out_image[:, ::-1], out_label[:, ::-1]

        out_image, out_label = _pad_centred(out_image, out_label, self.size)
        h, w = out_label.shape
        top = int(rng.integers(0, h - self.size + 1))
        left = int(rng.integers(0, w - self.size + 1))
        window = (slice(top, top + self.size), slice(left, left + self.size))
        return np.ascontiguousarray(out_image[window]), np.ascontiguousarray(out_label[window])


def train_augment(recipe: str, size: int, resize_to: int = 0) -> TrainAugment:
    """The training augmentation ``recipe`` for a size x size network input.

    - "pfenet": PFENet's recipe (scale 0.9-1.1 of the original image, rotation +-10 degrees with
      p = 0.5, Gaussian blur p = 0.5, mirror p = 0.5, crop with mean / 255 padding).
    - "paper": stretch to resize_to x resize_to (0 = ``size``, the paper's 473 x 473), then the
      same rotation, mirror and random crop of size x size; no scale jitter, no blur (the paper
      names neither). The angle range and probabilities are PFENet's: the paper gives none. With
      resize_to = size the crop window can only sit at (0, 0).
    """
    if recipe not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {recipe!r}")
    if recipe == "pfenet":
        if resize_to:
            raise ValueError("resize_to applies to the 'paper' augmentation only")
        return TrainAugment(size)
    return TrainAugment(size, scale=(1.0, 1.0), blur_p=0.0, resize_to=resize_to or size)


class TestResize:
    """Deterministic test-time resizing to size x size.

    - mode "pad" (PFENet): the longer side becomes ``size`` and the shorter one
      floor(short * size / long), keeping the aspect ratio; both are then floored to a multiple of
      ``multiple`` (PFENet uses 8; 1 = off). The image is placed top-left on a canvas filled with 0,
      the label on one filled with 255.
    - mode "stretch" (PANet): resize to size x size ignoring the aspect ratio.

    The image is resized bilinearly, the label with NEAREST. ``__call__(image uint8 [H, W, 3],
    label uint8 [H, W], rng=None)`` returns (image uint8 [size, size, 3], label uint8 [size, size]);
    ``rng`` is accepted for interface compatibility and unused.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, size: int, mode: str = "pad", multiple: int = 1) -> None:
        self.size = _check_size(size)
        if mode not in RESIZE_MODES:
            raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
        if multiple < 1 or multiple > self.size:
            raise ValueError(f"multiple must be in 1..size={self.size}, got {multiple}")
        self.mode = mode
        self.multiple = int(multiple)

    def __repr__(self) -> str:
        extra = f", multiple={self.multiple}" if self.multiple != 1 else ""
        return f"TestResize(size={self.size}, mode={self.mode!r}{extra})"

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the resized content before padding, for an input of height x width."""
        return content_shape(height, width, self.size, self.mode, self.multiple)

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        check_pair(image, label)
        h, w = self.resized_shape(*label.shape)
        img, lab = image, label
        if (h, w) != label.shape:
            img = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
            lab = np.asarray(Image.fromarray(label).resize((w, h), Image.Resampling.NEAREST))
        if (h, w) == (self.size, self.size):
            return np.ascontiguousarray(img), np.ascontiguousarray(lab)
        out_image = np.zeros((self.size, self.size, 3), np.uint8)
        out_label = np.full((self.size, self.size), IGNORE_INDEX, np.uint8)
        out_image[:h, :w] = img
        out_label[:h, :w] = lab
        return out_image, out_label
