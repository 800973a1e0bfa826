"""Label maps drawn over frames: a fixed colour per class, alpha blending and a legend.

numpy for the blending; the legend's text uses OpenCV's ``putText`` when OpenCV is installed and
the names are ASCII (its Hershey fonts have no other glyphs), else PIL's ``ImageDraw``.
All images are uint8 [H, W, 3] RGB.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# RGB colour of label i (label 0, background, is never painted). Distinct, saturated colours;
# labels beyond the table reuse it cyclically.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (145, 30, 180),
    (70, 240, 240),
    (245, 130, 48),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (0, 0, 128),
    (250, 190, 212),
    (220, 190, 255),
    (255, 215, 180),
    (128, 128, 128),
    (255, 255, 255),
)


def class_color(label: int) -> tuple[int, int, int]:
    """RGB colour of label ``label`` (>= 1)."""
    return PALETTE[1 + (label - 1) % (len(PALETTE) - 1)] if label > 0 else PALETTE[0]


def color_table() -> np.ndarray:
    """uint8 [256, 3]: RGB colour of every possible label value."""
    return np.array([class_color(i) for i in range(256)], dtype=np.uint8)


def colorize(labels: np.ndarray) -> np.ndarray:
    """labels uint8 [H, W] -> uint8 [H, W, 3] RGB, background black."""
    return color_table()[labels]


def overlay(
    frame: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend class colours over a frame, then draw a legend of ``class_names`` (when given).

    Args:
        frame: uint8 [H, W, 3] RGB.
        labels: uint8 [H, W]; 0 = background (left as is), i = the i-th class.
        class_names: the classes' names in label order (label 1 first).
        alpha: weight of the class colour in [0, 1].
    Returns:
        a new uint8 [H, W, 3] RGB image.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or labels.shape != frame.shape[:2]:
        raise ValueError(
            f"frame [H, W, 3] and labels [H, W] must match, got {frame.shape} and {labels.shape}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = frame.copy()
    painted = labels > 0
    if painted.any():
        colours = color_table()[labels[painted]].astype(np.float32)
        blended = frame[painted].astype(np.float32) * (1.0 - alpha) + colours * alpha
        out[painted] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if class_names:
        draw_legend(out, class_names)
    return out


def _legend_layout(height: int, width: int, count: int) -> tuple[int, int]:
    """(row height, swatch side) in pixels: 1/16 of the frame's shorter side (8..72 px), so the
    legend keeps the same share of small and large frames (about 5 % of the area for two
    classes), and never taller than the frame."""
    row = int(np.clip(min(height, width) // 16, 8, 72))
    row = min(row, max(6, height // max(count, 1)))
    return row, max(4, row - max(2, row // 5))


def draw_legend(image: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """Draw, in place at the top-left corner, one row per class: its colour swatch and name.

    image uint8 [H, W, 3] RGB (contiguous, modified and returned).
    """
    height, width = image.shape[:2]
    row, side = _legend_layout(height, width, len(class_names))
    pad = max(1, row // 6)  # 1 px at the smallest rows keeps the legend near 7 % of a 96 px frame
    text_x = 2 * pad + side
    cv2 = _optional_cv2() if all(name.isascii() for name in class_names) else None
    if cv2 is not None:
        scale = side / 22.0  # Hershey simplex capital height is about 22 px at scale 1
        thickness = max(1, row // 16)
        text_width = max(
            cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0]
            for name in class_names
        )
    else:
        font = _pil_font(side)
        text_width = int(max(font.getlength(name) for name in class_names))
    # A darkened backdrop behind the legend keeps the text readable on any frame.
    box_w, box_h = min(width, text_x + text_width + pad), min(height, len(class_names) * row + pad)
    image[:box_h, :box_w] = (image[:box_h, :box_w].astype(np.uint16) * 2 // 5).astype(np.uint8)
    for i in range(len(class_names)):
        top = pad + i * row
        image[top : min(top + side, height), pad : pad + side] = class_color(i + 1)
    if cv2 is not None:
        for i, name in enumerate(class_names):
            baseline = pad + i * row + side - max(1, side // 8)
            cv2.putText(
                image,
                name,
                (text_x, baseline),
                cv2.FONT_HERSHEY_SIMPLEX,
                scale,
                (255, 255, 255),
                thickness,
                cv2.LINE_AA,
            )
        return image
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(class_names):
        draw.text((text_x, pad + i * row), name, fill=(255, 255, 255), font=font)
    image[...] = np.asarray(canvas)
    return image


def _pil_font(size: int):
    """DejaVu Sans (wide Unicode coverage) when the system has it, else Pillow's own font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _optional_cv2():
    """OpenCV, or None when it is not installed (an optional dependency, imported on use)."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2
