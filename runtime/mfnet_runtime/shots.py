"""Support shots: an (image, mask) pair checked and fitted to the support encoder's input.

A shot is refused before any engine runs when its mask does not match its image, holds no
object pixel, or holds an object so small that it vanishes at the encoder's feature resolution
(the encoder would pool it into a meaningless prototype). The feature map's side and the mask's
weight there are computed as the exported graphs compute them (stride 8, bilinear mask resize
with align_corners=True).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .errors import RuntimeInputError
from .images import ImageInput, as_image_array, as_mask_array, fit

# The support encoder pools with sum(f * w) / max(sum(w), 1e-5): a mask whose weight at feature
# resolution does not exceed that floor would give a shrunken, meaningless prototype.
MIN_FEATURE_AREA = 1e-5


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


def prepare_shot(
    image: ImageInput, mask: Any, size: int, mode: str, backbone: str, color: str, label: str
) -> tuple[np.ndarray, np.ndarray]:
    """One support shot -> (uint8 [S, S, 3] RGB, uint8 [S, S] 0/1/255), checked.

    ``label`` names the shot in errors, e.g. "class 'cat', shot 2".
    """
    array, bgr = as_image_array(image, color, what=f"support image of {label}")
    labels = as_mask_array(mask, what=f"mask of {label}")
    if labels.shape != array.shape[:2]:
        raise RuntimeInputError(
            f"the mask of {label} is {labels.shape[0]}x{labels.shape[1]} but its image is "
            f"{array.shape[0]}x{array.shape[1]}; a mask must have its image's height and width"
        )
    if not (labels == 1).any():
        raise RuntimeInputError(
            f"the mask of {label} is empty (no object pixel; ignore-only pixels do not count): "
            "mark the object with 1, 255 or True"
        )
    fitted, _ = fit(array, size, mode, Image.Resampling.BILINEAR)
    fitted_mask, _ = fit(labels, size, mode, Image.Resampling.NEAREST)
    if bgr:
        fitted = np.ascontiguousarray(fitted[:, :, ::-1])
    side = feature_side(backbone, size)
    if not (fitted_mask == 1).any() or feature_area(fitted_mask == 1, side) <= MIN_FEATURE_AREA:
        raise RuntimeInputError(
            f"the object in the mask of {label} ({int((labels == 1).sum())} pixels) vanishes "
            f"after resizing to the network input {size}x{size} (feature map {side}x{side}): "
            "use a support image where the object is larger, or crop it tighter"
        )
    return fitted, fitted_mask
