"""The two exceptions of the runtime: bad inputs from the caller, and unusable engines.

``RuntimeInputError`` is a ``ValueError``: something the caller passed (an image, a mask, a
support set, an option) cannot be used; the message says which and how to fix it.
``EngineError`` is a ``RuntimeError``: the export directory, an engine file or the inference
backend cannot be used here; the message names the file and the command that recreates it.
``MissingDependencyError`` is an ``ImportError`` (and a ``RuntimeInputError``): an optional
package a feature needs is not installed; the message names the ``pip install`` command (the
package's extra) that adds it.
``ServerError`` is an ``EngineError``: an inference server (``python -m mfnet_runtime serve``)
cannot be reached, stopped answering within the timeout, died, or refused a request; the
message names the server and what to do.
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


class ServerError(EngineError):
    """An MFNet inference server that cannot be reached, timed out, died or refused a request.

    ``url`` is the server's address; ``kind`` is "unreachable" (nothing answers, or the
    connection broke: a dead or restarting server), "timeout" (no answer in time) or "refused"
    (the server answered with an error: a bad request, or a failure inside the model).
    """

    def __init__(self, message: str, url: str = "", kind: str = "refused") -> None:
        super().__init__(message)
        self.url = url
        self.kind = kind


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
