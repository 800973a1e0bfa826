"""Choosing between the compiled ``mfnet_ext`` operators and their PyTorch references.

Every op of ``mfnet.ops`` with a CUDA twin takes ``impl``:

* ``"reference"``: the pure-PyTorch reference (the specification), on any device;
* ``"cuda"``: the compiled extension, built on first use if needed; it fails loudly (naming the
  build command) when the extension cannot be had. On CPU tensors it runs the extension's C++ CPU
  kernel, which shares its per-element math with the CUDA kernel (that is how CI tests it);
* ``"auto"`` (default): the extension for CUDA tensors when it loads, the reference otherwise
  (CPU tensors, no toolkit, a failed build: one logged warning, then the reference). On the CPU,
  "auto" therefore runs exactly the reference. During an ONNX export "auto" also keeps to the
  reference, which the exporter can translate.
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType

import torch

log = logging.getLogger(__name__)

IMPLS = ("auto", "reference", "cuda")
BUILD_HINT = (
    "build it with `CUDA_HOME=/usr/local/cuda python -m mfnet_ext build` (just in time, into the "
    "cache) or `MFNET_BUILD_CUDA_EXT=1 CUDA_HOME=/usr/local/cuda pip install "
    "--no-build-isolation -e .` (ahead of time); see docs/cuda_ext.md"
)


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def extension_for(impl: str, device: torch.device) -> ModuleType | None:
    """The loaded ``mfnet_ext`` package when ``impl`` selects it for tensors on ``device``, or
    None when the reference must run.

    Raises:
        ValueError: an unknown ``impl``.
        RuntimeError: ``impl="cuda"`` and the extension is not importable or cannot be built.
    """
    check_impl(impl)
    if impl == "reference":
        return None
    if impl == "auto" and (device.type != "cuda" or torch.onnx.is_in_onnx_export()):
        return None
    try:
        extension = importlib.import_module("mfnet_ext")
    except ImportError as error:
        _unavailable(
            impl,
            f"the package mfnet_ext is not importable ({error}); it is "
            "installed with mfnet (`pip install -e .`)",
            error,
        )
        return None
    try:
        extension.load()
    except extension.ExtensionUnavailable as error:
        _unavailable(impl, str(error), error)
        return None
    return extension


def _unavailable(impl: str, reason: str, error: Exception) -> None:
    if impl == "cuda":
        raise RuntimeError(
            f"impl='cuda' needs the compiled mfnet_ext extension, which is unavailable: {reason}. "
            f"Use impl='auto' or 'reference', or {BUILD_HINT}"
        ) from error
    _warn_fallback(reason)


@functools.cache
def _warn_fallback(reason: str) -> None:
    """Logged once per distinct reason: impl='auto' falls back to the PyTorch references."""
    log.warning(
        "the mfnet_ext CUDA extension is unavailable (%s); impl='auto' uses the PyTorch "
        "references, which compute the same, more slowly",
        reason,
    )
