"""Atomic file writes: a reader never sees a half-written file, even after a crash."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` via a hidden temporary file in the same folder (``.NAME.*.tmp``)
    and ``os.replace``. ``durable`` also fsyncs the file before the rename (checkpoints,
    manifests), so a power loss cannot leave an empty file behind the new name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
