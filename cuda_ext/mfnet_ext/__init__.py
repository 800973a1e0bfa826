"""mfnet_ext: the custom operators of MFNet (fused masked global pooling, PML triplet sampling).

Importing this package needs no CUDA and compiles nothing. The operators live in
``torch.ops.mfnet_ext`` once ``load()`` has found or built the compiled library (see
``_loader``); ``mfnet_ext.masked_pooling`` and ``mfnet_ext.triplet_sampling`` are their typed
Python APIs. The pure-PyTorch references, which are the specification and the fallback, are in
``mfnet.ops``; ``mfnet.ops.*(impl=...)`` chooses.

Command line: ``python -m mfnet_ext build`` (compile into the cache now) and
``python -m mfnet_ext info`` (what would be loaded, from where). See docs/cuda_ext.md.
"""

from . import masked_pooling
from ._loader import (
    AOT_COMMAND,
    BUILD_COMMAND,
    Extension,
    ExtensionUnavailable,
    arch_list,
    build_directory,
    cuda_home,
    is_loaded,
    library_path,
    load,
    reset,
    sources,
)

__all__ = [
    "AOT_COMMAND",
    "BUILD_COMMAND",
    "Extension",
    "ExtensionUnavailable",
    "arch_list",
    "build_directory",
    "cuda_home",
    "is_loaded",
    "library_path",
    "load",
    "masked_pooling",
    "reset",
    "sources",
]
