"""Typed Python API of the masked-pooling operators, with their fake kernels and autograd.

The operators are declared in ``csrc/registration.cpp`` and implemented in
``csrc/masked_pooling.cu`` (CUDA) and ``csrc/masked_pooling_cpu.cpp`` (CPU); this module adds,
through ``torch.library``, what torch.compile and autograd need:

* fake (meta) kernels: output shape and dtype without computing anything;
* autograd of ``masked_global_pool`` with respect to the features (the masks are not
  differentiable): its backward is the registered operator ``masked_global_pool_backward``;
* autograd of ``masked_global_pool_backward`` (linear in its gradient input; the adjoint of
  "broadcast times weight / area" is ``masked_global_pool`` itself), so double backward works.

``register_python_kernels`` is called by the loader right after the library is loaded; the
functions below load the library on first use (compiling it if needed).
"""

from __future__ import annotations

import functools

import torch

from . import _loader


def masked_global_pool(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Fused masked global pooling.

    Args:
        features: [B, C, h, w] float32 / float16 / bfloat16 (float64 too: accumulated in float64).
        masks: [B, H, W] foreground at image resolution: bool or uint8 (read as they are) or any
            real dtype (converted to float32), values {0, 1}.
    Returns:
        [B, C] in the features' dtype: sum(f * m) / max(sum(m), 1e-5), m = the mask bilinearly
        resized (align_corners=True) to h x w inside the kernel, accumulated in float32.
    """
    _ensure_loaded()
    return torch.ops.mfnet_ext.masked_global_pool.default(features, masks)


def masked_global_pool_backward(
    grad_pooled: torch.Tensor, masks: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Gradient of ``masked_global_pool`` with respect to the features.

    grad_pooled [B, C], masks [B, H, W] -> [B, C, height, width] in grad_pooled's dtype:
    grad_pooled[b, c] / max(area_b, 1e-5) * m_b(i, j).
    """
    _ensure_loaded()
    return torch.ops.mfnet_ext.masked_global_pool_backward.default(
        grad_pooled, masks, height, width
    )


def _ensure_loaded() -> None:
    # torch.compile traces the operator call only; loading is done before (and is not traceable).
    if not torch.compiler.is_compiling():
        _loader.load()


# ---------------------------------------------------------------------------- fake kernels
def _pool_fake(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    torch._check(
        features.dim() == 4, lambda: f"features must be [B, C, h, w], got {features.shape}"
    )
    torch._check(masks.dim() == 3, lambda: f"masks must be [B, H, W], got {masks.shape}")
    torch._check(features.shape[0] == masks.shape[0], lambda: "features and masks differ in B")
    return features.new_empty((features.shape[0], features.shape[1]))


def _pool_backward_fake(
    grad_pooled: torch.Tensor, masks: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    torch._check(
        grad_pooled.dim() == 2, lambda: f"grad_pooled must be [B, C], got {grad_pooled.shape}"
    )
    torch._check(masks.dim() == 3, lambda: f"masks must be [B, H, W], got {masks.shape}")
    return grad_pooled.new_empty((grad_pooled.shape[0], grad_pooled.shape[1], height, width))


# ---------------------------------------------------------------------------------- autograd
def _pool_setup_context(ctx, inputs, output) -> None:
    features, masks = inputs
    ctx.save_for_backward(masks)
    ctx.feature_size = (features.shape[2], features.shape[3])
    ctx.feature_dtype = features.dtype


def _pool_backward_formula(ctx, grad_pooled: torch.Tensor):
    (masks,) = ctx.saved_tensors
    grad_features = None
    if ctx.needs_input_grad[0]:
        height, width = ctx.feature_size
        grad_features = torch.ops.mfnet_ext.masked_global_pool_backward.default(
            grad_pooled.to(ctx.feature_dtype), masks, height, width
        )
    return grad_features, None


def _backward_setup_context(ctx, inputs, output) -> None:
    grad_pooled, masks, _height, _width = inputs
    ctx.save_for_backward(masks)
    ctx.grad_dtype = grad_pooled.dtype


def _backward_backward_formula(ctx, grad_grad_features: torch.Tensor):
    (masks,) = ctx.saved_tensors
    grad_grad_pooled = None
    if ctx.needs_input_grad[0]:
        grad_grad_pooled = torch.ops.mfnet_ext.masked_global_pool.default(
            grad_grad_features.to(ctx.grad_dtype), masks
        )
    return grad_grad_pooled, None, None, None


@functools.cache
def register_python_kernels() -> None:
    """Register the fake kernels and autograd formulas (once; the library must be loaded)."""
    torch.library.register_fake("mfnet_ext::masked_global_pool", _pool_fake)
    torch.library.register_fake("mfnet_ext::masked_global_pool_backward", _pool_backward_fake)
    torch.library.register_autograd(
        "mfnet_ext::masked_global_pool", _pool_backward_formula, setup_context=_pool_setup_context
    )
    torch.library.register_autograd(
        "mfnet_ext::masked_global_pool_backward",
        _backward_backward_formula,
        setup_context=_backward_setup_context,
    )
