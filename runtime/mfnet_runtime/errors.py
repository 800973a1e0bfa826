"""The two exceptions of the runtime: bad inputs from the caller, and unusable engines.

``RuntimeInputError`` is a ``ValueError``: something the caller passed (an image, a mask, a
support set, an option) cannot be used; the message says which and how to fix it.
``EngineError`` is a ``RuntimeError``: the export directory, an engine file or the inference
backend cannot be used here; the message names the file and the command that recreates it.
``MissingDependencyError`` is an ``ImportError`` (and a ``RuntimeInputError``): an optional
package a feature needs is not installed; the message names the ``pip install`` command (the
package's extra) that adds it.
"""

from __future__ import annotations


class RuntimeInputError(ValueError):
    """An input (image, mask, support set, option) that the runtime cannot use."""


class EngineError(RuntimeError):
    """Missing, tampered or incompatible engine files, or a backend unavailable here."""


class MissingDependencyError(RuntimeInputError, ImportError):
    """An optional dependency (OpenCV, onnx, TensorBoard, ...) that a feature needs is missing.

    Also a ``RuntimeInputError``, so code that handles the runtime's input errors (as the
    OpenCV check always raised) keeps catching it."""


def require(module: str, feature: str, install: str):
    """Import ``module`` or raise ``MissingDependencyError``: "``feature`` needs ``module``:
    ``install``" (e.g. ``pip install 'mfnet-runtime[video]'``)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(
            f"{feature} needs the {module.split('.')[0]} package, which is not installed: "
            f"{install} (import failed: {error})"
        ) from error


# The commands that recreate artifacts: the training package's export command, which works
# from an installed mfnet (``pip install -e '.[export]'``; export/to_onnx.py and
# export/to_trt.py in a source checkout are the same commands).
EXPORT_COMMAND = "python -m mfnet.export"
REEXPORT_COMMAND = EXPORT_COMMAND + " onnx --checkpoint {checkpoint} --out {directory}"
REBUILD_COMMAND = EXPORT_COMMAND + " trt --onnx-dir {directory} --precision {precision}"


def reexport_hint(directory: object, checkpoint: object = "CHECKPOINT") -> str:
    """The command that recreates an ONNX export directory from its training checkpoint."""
    return REEXPORT_COMMAND.format(directory=directory, checkpoint=checkpoint)


def rebuild_hint(directory: object, precision: str) -> str:
    """The command that rebuilds TensorRT engines of ``precision`` for this GPU and TensorRT."""
    return REBUILD_COMMAND.format(directory=directory, precision=precision)
