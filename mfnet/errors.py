"""The training package's error boundary: which exceptions its commands report as one line.

``mfnet_command`` decorates the ``main`` of ``train``, ``evaluate``, ``predict`` and the export
commands with the runtime's ``command_boundary`` (one definition of the boundary for both
packages): the typed errors below print ``error: <message>`` (one line, never the advice to
load a file with ``weights_only=False``) and exit with code 2; Ctrl-C exits with 130; any other
exception is a bug and keeps its traceback. ``docs/errors.md`` lists what raises what.

``EngineError`` (the runtime's) covers every artifact problem: an export directory, manifest
or engine that cannot be used (the artifact format is the runtime's: one reader for both
packages). ``ValueError`` is on the list because the frozen configs and the models' input
checks raise it for bad values (the runtime's ``RuntimeInputError`` is one too); ``OSError``
because a file that cannot be read or written (missing, a full disk, no permission) is the
user's to fix.
"""

from __future__ import annotations

from mfnet_runtime.boundary import (
    EXIT_INPUT_ERROR,
    EXIT_INTERRUPTED,
    command_boundary,
    error_line,
    scrub_unsafe_advice,
)
from mfnet_runtime.errors import EngineError, MissingDependencyError, require

from .checkpoint import CheckpointError
from .data.errors import DatasetError
from .device import DeviceUnavailable
from .model.backbone import WeightsUnavailableError

EXPORT_INSTALL = "pip install 'mfnet[export]'"
DATA_INSTALL = "pip install 'mfnet[data]'"

# What every mfnet command reports as one line with exit code 2.
MFNET_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointError,
    WeightsUnavailableError,
    DatasetError,
    EngineError,
    DeviceUnavailable,
    MissingDependencyError,
    ValueError,
    OSError,
)


def mfnet_command(*extra: type[BaseException]):
    """``command_boundary`` over ``MFNET_ERRORS`` (+ ``extra``, e.g. ``TensorRTUnavailable``)."""
    return command_boundary(*MFNET_ERRORS, *extra)


def require_export_dependencies(verify: bool = True) -> None:
    """onnx and onnxscript (the dynamo exporter) and, to verify, onnxruntime; else a
    ``MissingDependencyError`` naming the extra that installs them."""
    require("onnx", "ONNX export", EXPORT_INSTALL)
    require("onnxscript", "ONNX export (torch's dynamo exporter)", EXPORT_INSTALL)
    if verify:
        require("onnxruntime", "the verification of an ONNX export", EXPORT_INSTALL)


__all__ = [
    "DATA_INSTALL",
    "EXIT_INPUT_ERROR",
    "EXIT_INTERRUPTED",
    "EXPORT_INSTALL",
    "MFNET_ERRORS",
    "error_line",
    "mfnet_command",
    "require",
    "require_export_dependencies",
    "scrub_unsafe_advice",
]
