"""Atomic file writes: a reader never sees a half-written file, even after a crash.

The one definition for both packages: the runtime writes support sets and frame outputs with
it, the training package checkpoints, manifests and results (``mfnet.atomic``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` via a hidden temporary file in the same folder (``.NAME.*.tmp``)
    and ``os.replace``. ``durable`` also fsyncs the file before the rename (checkpoints,
    manifests, support sets), so a power loss cannot leave an empty file behind the new name.

    On any failure (a full disk, no permission, Ctrl-C) the temporary file is removed and
    ``path`` is as it was; an ``OSError`` names ``path``, not the temporary file.
    """
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                                 suffix=".tmp")
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename != str(path):
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise
