"""Atomic writes: a reader never sees a half-written file or export, even after a crash.

The one definition for both packages. ``atomic_write_bytes`` replaces one file (support sets,
frame outputs, checkpoints, manifests, results); ``staged_directory`` builds a whole directory
(an export) beside its target and swaps it in only when it is complete, so a failed or
interrupted export leaves the previous one exactly as it was. Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    """The process's file-creation mask, read without changing it where the system allows.

    (``os.umask`` can only be read by setting it, which would briefly affect other threads.)
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(path: Path, created: int) -> int:
    """The permission bits a replaced ``path`` gets: those of the file or folder it replaces, or
    what a plain ``open``/``mkdir`` would give a new one (``created`` minus the umask); the
    temporary files and folders made here are private (0600 / 0700) until then."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return created & ~_umask()


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
        descriptor, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), _final_mode(path, 0o666))
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


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike[str], seed: bool = False) -> Iterator[Path]:
    """Build a new version of the directory ``target`` in a hidden sibling, then swap it in.

    Yields the staging directory (``.NAME.*.staging`` beside ``target``). When the block ends
    normally, the staging directory replaces ``target`` in one rename; when it raises (a failed
    verification, a full disk, Ctrl-C), the staging directory is deleted and ``target`` is left
    exactly as it was. ``seed`` starts the staging directory with ``target``'s files (hard
    links where the file system allows, else copies), for updates that add files to an
    existing directory: files in it are only ever replaced (``atomic_write_bytes``), never
    modified in place, so a link cannot leak a change into the old version.
    """
    target = Path(target).resolve()  # "." has no sibling; a symlink keeps pointing at the new one
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, "exists and is a file, expected a directory", str(target)
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".staging")
    )
    try:
        staging.chmod(_final_mode(target, 0o777))
        if seed and target.is_dir():
            _link_tree(target, staging)
        yield staging
        _replace_directory(staging, target)
    finally:
        # after a swap this holds the previous version (or nothing); after an error, the
        # abandoned new one
        shutil.rmtree(staging, ignore_errors=True)


def _link_tree(source: Path, destination: Path) -> None:
    """Recreate ``source``'s tree under ``destination``: hard links to its files, else copies."""
    for path in sorted(source.rglob("*")):
        copy = destination / path.relative_to(source)
        if path.is_dir():
            copy.mkdir(exist_ok=True)
            continue
        try:
            os.link(path, copy)
        except OSError:  # another file system, or links not supported
            shutil.copy2(path, copy)


def _replace_directory(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``; afterwards ``new`` holds the previous ``target`` (if any)."""
    if not target.exists():
        os.rename(new, target)
        return
    if _exchange(new, target):  # Linux: both names swapped in one atomic step
        return
    # Elsewhere: two renames; a failure of the second puts the previous version back.
    previous = target.with_name(f".{target.name}.{os.getpid()}.previous")
    os.rename(target, previous)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(previous, target)
        raise
    os.rename(previous, new)


def _exchange(first: Path, second: Path) -> bool:
    """``renameat2(..., RENAME_EXCHANGE)``: swap two paths atomically. False where the system
    or the file system does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # on use: the runtime stays light at import

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))
