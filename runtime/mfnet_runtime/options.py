"""Command-line option types: ranges and paths checked while the arguments are parsed.

Paths are checked for their kind (a directory where a file is expected is named as such, not
as "does not exist") and, for outputs, for a writable place to create them. Inputs whose
loaders report a missing path with its own fix (checkpoints, export directories, SPECs) use
the kind-only checks ``file_path`` / ``directory_path``; the loader's typed error covers absence.

Each factory returns a callable for argparse's ``type=``; a bad value raises
``argparse.ArgumentTypeError``, so the command stops with argparse's usage line and exit code 2
before anything runs. Shared by ``python -m mfnet_runtime`` and the training package's commands.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An int within [minimum, maximum] (either bound optional)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        _check_range(value, text, minimum, maximum)
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def number(
    minimum: float | None = None, maximum: float | None = None, exclusive_minimum: bool = False
) -> Callable[[str], float]:
    """A finite float within [minimum, maximum] (``(minimum, ...`` with ``exclusive_minimum``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if exclusive_minimum and minimum is not None and value <= minimum:
            raise argparse.ArgumentTypeError(f"must be > {minimum:g}, got {text}")
        _check_range(value, text, minimum, maximum)
        return value

    parse.__name__ = "number"
    return parse


def _check_range(value: float, text: str, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {text}")
    if maximum is not None and value > maximum:
        raise argparse.ArgumentTypeError(f"must be <= {maximum:g}, got {text}")


positive_int = integer(minimum=1)
non_negative_int = integer(minimum=0)


def existing_file(text: str) -> Path:
    """A path to a readable file (a directory or a missing path is a usage error)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a file")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} is not readable (permission denied)")
    return path


def existing_directory(text: str) -> Path:
    """A path to an existing directory (a file or a missing path is a usage error)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, expected a directory")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return path


def file_path(text: str) -> Path:
    """A path that, if it exists, is a file. For inputs whose loader reports a missing file
    with its own fix (checkpoints: how to train one), so only the kind is checked here."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a file")
    return path


def directory_path(text: str) -> Path:
    """A path that, if it exists, is a directory (export directories: the loader names the
    export command when it is missing)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, expected a directory")
    return path


def existing_path(text: str) -> Path:
    """A file or a directory that exists (e.g. a support SPEC: a JSON file or a folder)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return path


def _check_creatable(path: Path, text: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {text}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create {text}: {parent} is not writable")


def output_file(text: str) -> Path:
    """A file to write: not a directory, in a writable directory (created if missing)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} is not writable (permission denied)")
    _check_creatable(path, text)
    return path


def output_directory(text: str) -> Path:
    """A directory to write into: not an existing file, creatable or writable."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, expected a directory")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text} is not writable (permission denied)")
    _check_creatable(path, text)
    return path


def output_path(text: str) -> Path:
    """A file or a directory to write (e.g. a video file or a folder of frames)."""
    path = Path(text)
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} is not writable (permission denied)")
    _check_creatable(path, text)
    return path
