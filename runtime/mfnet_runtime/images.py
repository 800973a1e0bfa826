"""Image and mask inputs: reading, checking, fitting to the network size, and mapping back.

Images are numpy uint8 [H, W, 3] in RGB order (``color="bgr"`` for OpenCV frames), or a path to
an image file (read with PIL, EXIF orientation applied, always RGB: ``color`` is ignored for
files). Grayscale [H, W] / [H, W, 1] images are replicated to three channels; RGBA / BGRA lose
their alpha channel (not composited). 16-bit and float images are refused: the message says how
to convert them, because guessing their range would silently change the colours.

Masks are [H, W] (or [H, W, 1]) arrays or paths to single-channel image files: bool (True =
object), {0, 1}, {0, 255} (255 = object) or {0, 1, 255} (1 = object, 255 = ignore). They are
normalised to uint8 {0 = background, 1 = object, 255 = ignore}, the support encoder's input.

Fitting to the S x S network input follows the manifest's ``resize``: "pad" scales the longer
side to S keeping the aspect ratio and places the content top-left on a zero canvas (masks are
padded with 0); "stretch" resizes to S x S. Images are resized bilinearly, masks and label maps
with nearest neighbour (PIL). This module owns that geometry (``content_shape``, ``Geometry``):
the training package's test-time resize (``mfnet.data.transforms.TestResize``) and its PyTorch
twin command (``mfnet.predict``) use it, so evaluation, export and runtime fit frames alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from .errors import RuntimeInputError

ImageInput = np.ndarray | str | Path
COLORS = ("rgb", "bgr")
_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def check_color(color: str) -> str:
    """``color`` lower-cased ("rgb" | "bgr"), or a ``RuntimeInputError``."""
    if not isinstance(color, str) or color.lower() not in COLORS:
        raise RuntimeInputError(f"color must be 'rgb' or 'bgr' (OpenCV frames), got {color!r}")
    return color.lower()


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode an image file, EXIF-oriented; errors name the file."""
    if path.is_dir():
        raise RuntimeInputError(f"{what} {path} is a directory, expected an image file")
    if not path.is_file():
        raise RuntimeInputError(f"{what} file {path} does not exist")
    try:
        with Image.open(path) as handle:
            handle.load()  # decode now: a truncated file fails here, not later
            return ImageOps.exif_transpose(handle)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise RuntimeInputError(
            f"{what} file {path} cannot be read ({type(error).__name__}: {error}): it is "
            "corrupt, truncated or not an image"
        ) from error


def read_image_file(path: str | Path, what: str = "image") -> np.ndarray:
    """uint8 [H, W, 3] RGB from an image file."""
    image = _open(Path(path), what)
    if image.mode in _HIGH_DEPTH_MODES:
        raise RuntimeInputError(
            f"{what} file {path} has {image.mode} pixels (16-bit or float); save it as 8-bit "
            "RGB first, e.g. with OpenCV: cv2.imwrite(out, cv2.convertScaleAbs(img, "
            "alpha=255 / 65535))"
        )
    return np.asarray(image.convert("RGB"))


def _depth_hint(dtype: np.dtype) -> str:
    """How to convert an image of ``dtype`` to uint8 (for the refusal's message)."""
    if np.issubdtype(dtype, np.floating):
        return (
            "float images are refused (their range is ambiguous); for values in [0, 1] "
            "convert with (np.clip(image, 0, 1) * 255).round().astype(np.uint8)"
        )
    if np.issubdtype(dtype, np.integer):
        return (
            "images with more than 8 bits per channel are refused; for 16-bit images "
            "convert with (image // 257).astype(np.uint8)"
        )
    return "convert it to uint8 RGB"


def as_image_array(
    image: ImageInput, color: str = "rgb", what: str = "image"
) -> tuple[np.ndarray, bool]:
    """Check an image input -> (uint8 [H, W, 3] array, whether its channels are BGR).

    The channel flip of BGR arrays is left to the caller so that it can run after resizing,
    on the smaller image.
    """
    color = check_color(color)
    if isinstance(image, (str, Path)):
        return read_image_file(image, what), False
    if not isinstance(image, np.ndarray):
        raise RuntimeInputError(
            f"{what} must be a numpy uint8 [H, W, 3] array or an image file "
            f"path, got {type(image).__name__}"
        )
    if image.dtype != np.uint8:
        raise RuntimeInputError(f"{what} has dtype {image.dtype}: {_depth_hint(image.dtype)}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:  # grayscale: the same value in R, G and B
        image = np.repeat(image[:, :, None], 3, axis=2)
        color = "rgb"
    elif image.ndim == 3 and image.shape[2] == 4:  # RGBA / BGRA: alpha dropped
        image = image[:, :, :3]
    elif image.ndim != 3 or image.shape[2] != 3:
        raise RuntimeInputError(
            f"{what} must be [H, W, 3] (or grayscale [H, W], RGBA "
            f"[H, W, 4]), got shape {image.shape}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise RuntimeInputError(f"{what} is empty (shape {image.shape})")
    return image, color == "bgr"


def as_mask_array(mask: np.ndarray | str | Path, what: str = "mask") -> np.ndarray:
    """Check a mask input -> uint8 [H, W] with 0 = background, 1 = object, 255 = ignore."""
    if isinstance(mask, (str, Path)):
        picture = _open(Path(mask), what)
        array = np.asarray(picture)
        if array.ndim == 3:  # LA / RGB / RGBA: fine if the colour channels agree
            if picture.mode.endswith("A"):
                array = array[..., :-1]
            if not (array == array[..., :1]).all():
                raise RuntimeInputError(
                    f"{what} file {mask} has colours; save the mask as a "
                    "single-channel (grayscale or palette) image"
                )
            array = array[..., 0]
        mask = array
    if not isinstance(mask, np.ndarray):
        raise RuntimeInputError(
            f"{what} must be a numpy [H, W] array or a mask image path, got {type(mask).__name__}"
        )
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim != 2:
        raise RuntimeInputError(f"{what} must be [H, W], got shape {mask.shape}")
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise RuntimeInputError(f"{what} has dtype {mask.dtype}; use bool or uint8")
    values = np.unique(mask)
    found = set(values.tolist())
    if found <= {0, 1}:
        return (mask == 1).astype(np.uint8)
    if found <= {0, 255}:  # a binary mask saved as an image: 255 is the object
        return (mask == 255).astype(np.uint8)
    if found <= {0, 1, 255}:  # 1 = object, 255 = ignore (VOC-style boundary)
        return np.where(mask == 255, 255, mask == 1).astype(np.uint8)
    shown = ", ".join(f"{v:g}" for v in values[:10].tolist())
    more = f" and {len(values) - 10} more" if len(values) > 10 else ""
    raise RuntimeInputError(
        f"{what} has values {{{shown}}}{more}; a mask must be bool, {{0, 1}}, {{0, 255}} "
        "(255 = object) or {0, 1, 255} (1 = object, 255 = ignore)"
    )


class Geometry(NamedTuple):
    """Where a frame's content sits in the S x S network input: the frame is orig_h x orig_w,
    its content_h x content_w resized copy sits top-left (the rest is padding)."""

    orig_h: int
    orig_w: int
    content_h: int
    content_w: int


def content_shape(
    height: int, width: int, size: int, mode: str, multiple: int = 1
) -> tuple[int, int]:
    """(h, w) of an height x width image fitted into size x size, before padding.

    "stretch": (size, size). "pad": the longer side becomes exactly ``size`` and the shorter one
    floor(short * size / long) (integer arithmetic, as in evaluation); both are then floored to a
    multiple of ``multiple`` (PFENet's evaluation uses 8; exports and the runtime use 1), and
    never below it.
    """
    if mode == "stretch":
        return size, size
    longer = max(height, width)
    h, w = height * size // longer, width * size // longer
    return max(multiple, h // multiple * multiple), max(multiple, w // multiple * multiple)


def fit(
    array: np.ndarray, size: int, mode: str, resample: Image.Resampling
) -> tuple[np.ndarray, tuple[int, int]]:
    """[H, W(, 3)] uint8 -> [size, size(, 3)] uint8 placed top-left, zero padded; + content h, w."""
    h, w = content_shape(array.shape[0], array.shape[1], size, mode)
    if (h, w) != array.shape[:2]:
        array = np.asarray(Image.fromarray(array).resize((w, h), resample))
    if (h, w) == (size, size):
        return np.ascontiguousarray(array), (h, w)
    canvas = np.zeros((size, size) + array.shape[2:], np.uint8)
    canvas[:h, :w] = array
    return canvas, (h, w)


def prepare_image(
    image: ImageInput, size: int, mode: str, color: str = "rgb", what: str = "image"
) -> tuple[np.ndarray, Geometry]:
    """Any image input -> (uint8 [size, size, 3] RGB network input, its geometry)."""
    array, bgr = as_image_array(image, color, what)
    fitted, (h, w) = fit(array, size, mode, Image.Resampling.BILINEAR)
    if bgr:  # after resizing: the flip then touches size x size pixels only
        fitted = np.ascontiguousarray(fitted[:, :, ::-1])
    return fitted, Geometry(array.shape[0], array.shape[1], h, w)


def prepare_frames(
    frames: Sequence[ImageInput], size: int, mode: str, color: str = "rgb"
) -> tuple[np.ndarray, list[Geometry]]:
    """Frames of any sizes -> (uint8 [B, size, size, 3] RGB network input, one geometry each).

    numpy and PIL only, so it may run in another thread (e.g. a video decode thread).
    """
    batch = np.empty((len(frames), size, size, 3), np.uint8)
    geometry = []
    for i, frame in enumerate(frames):
        batch[i], shape = prepare_image(frame, size, mode, color, what=f"frame {i}")
        geometry.append(shape)
    return batch, geometry


def check_prepared(frames: object, size: int, what: str, min_batch: int = 0) -> np.ndarray:
    """Refuse anything but prepared frames, uint8 [B, S, S, 3] RGB with B >= ``min_batch``
    (``prepare_frames``' output); returned C-contiguous. ``what`` names them in the error."""
    if (
        not isinstance(frames, np.ndarray)
        or frames.dtype != np.uint8
        or frames.ndim != 4
        or frames.shape[1:] != (size, size, 3)
        or frames.shape[0] < min_batch
    ):
        got = (
            f"{frames.dtype} {list(frames.shape)}"
            if isinstance(frames, np.ndarray)
            else type(frames).__name__
        )
        batch = f" (B >= {min_batch})" if min_batch else ""
        raise RuntimeInputError(
            f"{what} must be uint8 [B, {size}, {size}, 3] RGB fitted to the network input"
            f"{batch}, got {got}"
        )
    return np.ascontiguousarray(frames)


def restore_labels(labels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """uint8 [S, S] labels of the network input -> uint8 [orig_h, orig_w] (crop, nearest)."""
    orig_h, orig_w, h, w = geometry
    content = labels[:h, :w]
    if (h, w) == (orig_h, orig_w):
        return np.ascontiguousarray(content)
    return np.asarray(Image.fromarray(content).resize((orig_w, orig_h), Image.Resampling.NEAREST))


def restore_probabilities(probabilities: np.ndarray, geometry: Geometry) -> np.ndarray:
    """float32 [N+1, S, S] -> float32 [N+1, orig_h, orig_w] (crop, bilinear per channel)."""
    orig_h, orig_w, h, w = geometry
    content = probabilities[:, :h, :w]
    if (h, w) == (orig_h, orig_w):
        return np.ascontiguousarray(content, dtype=np.float32)
    return np.stack(
        [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32)).resize(
                    (orig_w, orig_h), Image.Resampling.BILINEAR
                )
            )
            for channel in content
        ]
    )


def restore_smooth(probabilities: np.ndarray, geometry: Geometry) -> np.ndarray:
    """float32 [N+1, S, S] probabilities -> uint8 [orig_h, orig_w] labels: the argmax of the
    bilinearly upsampled probabilities, smoother than ``restore_labels`` on enlarged frames."""
    return restore_probabilities(probabilities, geometry).argmax(axis=0).astype(np.uint8)
