"""mfnet_runtime: torch-free inference for exported MFNet models (ONNX Runtime / TensorRT).

``Segmenter.load(engine_dir)`` opens an export directory; ``encode_support`` caches a support
set; ``segment`` / ``segment_batch`` / ``probabilities`` label frames with it.
"""

from __future__ import annotations

from .errors import EngineError, MissingDependencyError, RuntimeInputError
from .segmenter import Segmenter
from .support import SupportSet

__all__ = ["EngineError", "MissingDependencyError", "RuntimeInputError", "Segmenter",
           "SupportSet"]
__version__ = "0.1.0"
