"""Masked global pooling (paper Sec. III-B): average features over a resized support mask.

``masked_global_pool_reference`` is the specification: the fused CUDA kernel of ``cuda_ext``
must give the same result (forward and backward). ``masked_global_pool`` dispatches on ``impl``
(``mfnet.ops.extension``: "auto" | "reference" | "cuda").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .extension import IMPLS, extension_for

# Denominator floor: a mask that vanishes at feature resolution pools to the zero vector instead
# of dividing by zero. Callers that must not see such a prototype check ``mask_area`` first.
EMPTY_MASK_EPS = 1e-5

__all__ = [
    "EMPTY_MASK_EPS",
    "IMPLS",
    "mask_area",
    "masked_global_pool",
    "masked_global_pool_reference",
    "resize_mask",
]


def resize_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Foreground weights at feature resolution.

    Args:
        masks: [B, H, W] foreground mask (bool or {0, 1} numbers) at image resolution.
        size: (h, w) of the feature map.
    Returns:
        [B, 1, h, w] float32 weights in [0, 1] (bilinear, align_corners=True).
    """
    weights = masks.to(torch.float32).unsqueeze(1)  # [B, 1, H, W]
    return F.interpolate(weights, size=size, mode="bilinear", align_corners=True)


def mask_area(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B] float32: the pooling denominator, sum of the resized mask weights."""
    return resize_mask(masks, size).sum(dim=(1, 2, 3))


def masked_global_pool_reference(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Average of ``features`` weighted by the bilinearly resized foreground mask.

    Args:
        features: [B, C, h, w] float32/float16/bfloat16.
        masks: [B, H, W] foreground mask (bool or {0, 1}) at image resolution.
    Returns:
        [B, C] in the dtype of ``features``: sum(f * m) / max(sum(m), EMPTY_MASK_EPS), computed
        in float32.
    """
    _check_shapes(features, masks)
    h, w = features.shape[-2:]
    weights = resize_mask(masks, (h, w))  # [B, 1, h, w]
    weighted_sum = (features.float() * weights).sum(dim=(2, 3))  # [B, C]
    area = weights.sum(dim=(2, 3)).clamp_min(EMPTY_MASK_EPS)  # [B, 1]
    return (weighted_sum / area).to(features.dtype)


def masked_global_pool(
    features: torch.Tensor, masks: torch.Tensor, impl: str = "auto"
) -> torch.Tensor:
    """Dispatching front of the op: ``impl`` = "auto" | "reference" | "cuda" (see
    ``mfnet.ops.extension``).

    "reference" runs ``masked_global_pool_reference``; "cuda" runs the fused ``mfnet_ext`` kernel
    (CUDA tensors; the extension's C++ CPU kernel for CPU tensors), built on first use, and fails
    loudly when the extension cannot be had; "auto" runs the kernel for CUDA tensors when the
    extension loads and the reference otherwise (so on the CPU exactly the reference). Both
    compute the same (float32 accumulation); the gradient flows to ``features`` only.

    Args:
        features: [B, C, h, w] float32/float16/bfloat16.
        masks: [B, H, W] foreground mask (bool or {0, 1}) at image resolution.
    Returns:
        [B, C] in the dtype of ``features``.
    """
    _check_shapes(features, masks)
    extension = extension_for(impl, features.device)  # also rejects an unknown impl
    if extension is None:
        return masked_global_pool_reference(features, masks)
    return extension.masked_pooling.masked_global_pool(features, masks)


def _check_shapes(features: torch.Tensor, masks: torch.Tensor) -> None:
    if features.dim() != 4 or masks.dim() != 3 or features.shape[0] != masks.shape[0]:
        raise ValueError(
            f"expected features [B, C, h, w] and masks [B, H, W] with the same B, got "
            f"{tuple(features.shape)} and {tuple(masks.shape)}"
        )
