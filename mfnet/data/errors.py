"""Errors of the dataset loaders, shared by every benchmark."""

from __future__ import annotations


class DatasetError(RuntimeError):
    """A dataset file or folder is missing, corrupt, or holds values it must not hold; the
    message names the file and how to get or build it."""


class DatasetArgumentError(DatasetError, ValueError):
    """An invalid fold, split, role, filter or class id: both a ``DatasetError`` and a
    ``ValueError``."""
