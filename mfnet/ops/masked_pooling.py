"""Masked global pooling (paper Sec. III-B): average features over a resized support mask.

``masked_global_pool_reference`` is the specification: the fused CUDA kernel of ``cuda_ext``
must give the same result (forward and backward). ``masked_global_pool`` dispatches on ``impl``.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

# Denominator floor: a mask that vanishes at feature resolution pools to the zero vector instead
# of dividing by zero. Callers that must not see such a prototype check ``mask_area`` first.
EMPTY_MASK_EPS = 1e-5

IMPLS = ("auto", "reference", "cuda")


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
    if features.dim() != 4 or masks.dim() != 3 or features.shape[0] != masks.shape[0]:
        raise ValueError(
            f"expected features [B, C, h, w] and masks [B, H, W] with the same B, got "
            f"{tuple(features.shape)} and {tuple(masks.shape)}"
        )
    weights = resize_mask(masks, tuple(features.shape[-2:]))  # [B, 1, h, w]
    weighted_sum = (features.float() * weights).sum(dim=(2, 3))  # [B, C]
    area = weights.sum(dim=(2, 3)).clamp_min(EMPTY_MASK_EPS)  # [B, 1]
    return (weighted_sum / area).to(features.dtype)


def _cuda_ops():
    """The compiled extension's ops module, or None when it is not installed."""
    try:
        return importlib.import_module("mfnet_ext.ops")
    except ImportError:
        return None


def masked_global_pool(
    features: torch.Tensor, masks: torch.Tensor, impl: str = "auto"
) -> torch.Tensor:
    """Dispatching front of the op: ``impl`` = "auto" | "reference" | "cuda".

    "cuda" requires the ``mfnet_ext`` extension and CUDA tensors and fails loudly otherwise;
    "auto" uses it when both are there and the reference (which computes the same) otherwise.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return masked_global_pool_reference(features, masks)
    ops = _cuda_ops()
    if impl == "cuda":
        if ops is None:
            raise RuntimeError(
                "impl='cuda' needs the mfnet CUDA extension (package mfnet_ext), which is not "
                "installed; use impl='auto' or 'reference', or build the extension (cuda_ext/)"
            )
        if not features.is_cuda:
            raise RuntimeError("impl='cuda' needs CUDA tensors; got features on " + str(features.device))
    if ops is not None and features.is_cuda:
        return ops.masked_global_pool(features, masks)
    return masked_global_pool_reference(features, masks)
