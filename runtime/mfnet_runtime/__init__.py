"""mfnet_runtime: torch-free inference for exported MFNet models (ONNX Runtime / TensorRT).

``Segmenter.load(engine_dir)`` opens an export directory; ``encode_support`` caches a support
set (``add_shot`` grows it, ``load_support`` reads a saved one); ``segment`` / ``segment_batch``
/ ``probabilities`` label frames with it. A ``SupportSet`` is plain data: it is edited, saved
and loaded without any engine.
"""

from __future__ import annotations

from .errors import EngineError, MissingDependencyError, RuntimeInputError
from .segmenter import Segmenter
from .support import SupportSet

__all__ = ["EngineError", "MissingDependencyError", "RuntimeInputError", "Segmenter", "SupportSet"]
__version__ = "0.1.0"
