"""Finding, building and loading the compiled library of ``mfnet_ext``.

``load()`` makes the operators ``torch.ops.mfnet_ext.*`` available, trying in order:

1. an earlier load in this process (the operator namespace is already registered);
2. the ahead-of-time module ``mfnet_ext._C``, built by
   ``MFNET_BUILD_CUDA_EXT=1 CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .``;
3. a library already compiled into the build cache (see ``build_directory``);
4. with ``compile=True``: a just-in-time build of every ``csrc/*.cpp`` and ``csrc/*.cu`` with
   ``torch.utils.cpp_extension.load`` into the build cache (1-3 minutes, once per source version
   and torch version; concurrent processes wait for one build through torch's lock file).

After the library is loaded, ``register_python_kernels()`` of every public module of the package
that defines one (``mfnet_ext.masked_pooling``, ``mfnet_ext.triplet_sampling``, ...) is called
once: that is where each operator's fake (meta) kernel and autograd formula are registered with
``torch.library``.

Failures raise ``ExtensionUnavailable`` naming the cause and the command to retry. The outcome,
success or failure, is memoised per (compile, build root) with ``functools.cache``: a failed
build is not retried on every call (``reset()`` forgets the outcomes).

Environment: ``CUDA_HOME`` (default ``/usr/local/cuda`` when it exists), ``TORCH_CUDA_ARCH_LIST``
(default: the visible GPUs' compute capabilities, else 9.0 for the H100/H200),
``MFNET_EXT_BUILD_DIR`` (the build root, default ``$XDG_CACHE_HOME/mfnet_ext`` or
``~/.cache/mfnet_ext``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import logging
import os
import pkgutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("mfnet_ext")

PACKAGE_DIR = Path(__file__).resolve().parent
CSRC = PACKAGE_DIR / "csrc"
NAMESPACE = "mfnet_ext"
LIBRARY_NAME = "mfnet_ext_C"  # the just-in-time library: <build dir>/mfnet_ext_C.so
PROBE_OP = "masked_global_pool"  # an operator whose presence means the library is loaded
DEFAULT_CUDA_HOME = "/usr/local/cuda"
DEFAULT_ARCH_LIST = "9.0"  # H100 / H200 (sm_90) when no GPU is visible
BUILD_COMMAND = "python -m mfnet_ext build"
AOT_COMMAND = (
    "MFNET_BUILD_CUDA_EXT=1 CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e ."
)
EXTRA_CFLAGS = ("-O3",)
EXTRA_CUDA_CFLAGS = ("-O3",)


class ExtensionUnavailable(RuntimeError):
    """The compiled extension cannot be had: not built, no CUDA toolkit, or the build failed."""


@dataclass(frozen=True)
class Extension:
    """A loaded ``mfnet_ext`` library.

    origin: ``"aot"`` (the installed ``mfnet_ext._C``), ``"cached"`` (a library compiled earlier
    into the build cache), ``"jit"`` (compiled by this call) or ``"loaded"`` (registered earlier in
    this process); path: the shared library, when known; build_seconds: compile time (``"jit"``).
    """

    origin: str
    path: str | None = None
    build_seconds: float | None = None

    @property
    def ops(self) -> torch._ops._OpNamespace:
        """``torch.ops.mfnet_ext``."""
        return getattr(torch.ops, NAMESPACE)


def sources() -> list[Path]:
    """Every C++ and CUDA source of the library (``csrc/*.cpp`` and ``csrc/*.cu``), sorted."""
    return sorted([*CSRC.glob("*.cpp"), *CSRC.glob("*.cu")])


def _hashed_files() -> list[Path]:
    return sorted([*sources(), *CSRC.glob("*.h"), *CSRC.glob("*.cuh")])


def cuda_home() -> str | None:
    """The CUDA toolkit to compile with: $CUDA_HOME / $CUDA_PATH, else /usr/local/cuda when it
    exists, else torch's own guess (the parent of the ``nvcc`` on PATH). None if none is found.

    (The ``nvcc`` on PATH can be a wrapper script whose parent is no toolkit, which is why
    /usr/local/cuda comes before torch's guess.)
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    if Path(DEFAULT_CUDA_HOME, "bin", "nvcc").is_file():
        return DEFAULT_CUDA_HOME
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME


def arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST for the build: the environment's, else the compute capabilities of the
    visible GPUs, else 9.0."""
    given = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if given:
        return given
    if torch.cuda.is_available():
        capabilities = {
            torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())
        }
        return ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities))
    return DEFAULT_ARCH_LIST


def build_root(root: str | os.PathLike | None = None) -> Path:
    """Where the just-in-time builds go: ``root``, else $MFNET_EXT_BUILD_DIR, else
    $XDG_CACHE_HOME/mfnet_ext (default ~/.cache/mfnet_ext)."""
    if root is not None:
        return Path(root).expanduser().resolve()
    if os.environ.get("MFNET_EXT_BUILD_DIR"):
        return Path(os.environ["MFNET_EXT_BUILD_DIR"]).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache, "mfnet_ext").expanduser().resolve()


def build_directory(root: str | os.PathLike | None = None) -> Path:
    """The build folder of the current sources: ``<build root>/<torch version>-<digest>``.

    The digest covers the sources and headers, torch's and CUDA's versions, the arch list and the
    flags, so an edited source or another torch never loads a stale library.
    """
    digest = hashlib.sha256()
    for path in _hashed_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(
        f"{torch.__version__}|{torch.version.cuda}|{arch_list()}|{EXTRA_CFLAGS}|"
        f"{EXTRA_CUDA_CFLAGS}".encode()
    )
    return build_root(root) / f"{torch.__version__}-{digest.hexdigest()[:16]}"


def library_path(root: str | os.PathLike | None = None) -> Path:
    """The just-in-time library of the current sources (it may not exist yet)."""
    return build_directory(root) / f"{LIBRARY_NAME}.so"


def is_loaded() -> bool:
    """Whether the operators are registered in this process."""
    try:
        getattr(getattr(torch.ops, NAMESPACE), PROBE_OP)
    except (AttributeError, RuntimeError):
        return False
    return True


def load(
    compile: bool = True, build_root: str | os.PathLike | None = None, verbose: bool = False
) -> Extension:
    """Load the library (see the module docstring for the order); memoised.

    Args:
        compile: build it just in time when no built library is found (else raise).
        build_root: root of the just-in-time builds (default: ``MFNET_EXT_BUILD_DIR`` or the user
            cache); the build goes to a sub-folder named after torch and the sources' digest.
        verbose: show the compiler's output.
    Raises:
        ExtensionUnavailable: with the cause and the command to retry.
    """
    root = None if build_root is None else str(Path(build_root).expanduser().resolve())
    outcome = _load_outcome(compile, root, verbose)
    if isinstance(outcome, ExtensionUnavailable):
        raise ExtensionUnavailable(str(outcome)) from outcome.__cause__
    return outcome


def reset() -> None:
    """Forget memoised outcomes (a failed build is retried by the next ``load``). A library that
    was loaded stays loaded: a process cannot unload it."""
    _load_outcome.cache_clear()


@functools.cache
def _load_outcome(
    compile: bool, root: str | None, verbose: bool
) -> Extension | ExtensionUnavailable:
    try:
        return _load(compile, root, verbose)
    except ExtensionUnavailable as error:
        return error


def _load(compile: bool, root: str | None, verbose: bool) -> Extension:
    if is_loaded():
        _register_python_kernels()
        return Extension("loaded")
    aot = _import_aot()
    if aot is not None:
        return aot
    library = library_path(root)
    if library.is_file():
        _load_library(library)
        return Extension("cached", str(library))
    if not compile:
        raise ExtensionUnavailable(
            f"the mfnet_ext library is not built: there is neither the ahead-of-time module "
            f"mfnet_ext._C nor {library}; build it with `{BUILD_COMMAND}` (just in time, into the "
            f"cache) or install it with `{AOT_COMMAND}`"
        )
    return _build(library.parent, verbose)


def _import_aot() -> Extension | None:
    try:
        module = importlib.import_module(f"{NAMESPACE}._C")
    except ModuleNotFoundError as error:
        if error.name == f"{NAMESPACE}._C":
            return None  # not built ahead of time: the usual case
        raise
    except ImportError as error:  # built, but not loadable (e.g. against another torch)
        log.warning(
            "mfnet_ext._C is installed but cannot be loaded (%s); rebuild it with `%s`; "
            "trying the just-in-time build instead",
            error,
            AOT_COMMAND,
        )
        return None
    _register_python_kernels()
    return Extension("aot", getattr(module, "__file__", None))


def _load_library(path: Path) -> None:
    try:
        torch.ops.load_library(str(path))
    except OSError as error:
        raise ExtensionUnavailable(
            f"the mfnet_ext library {path} cannot be loaded ({error}); delete that folder and "
            f"rebuild with `{BUILD_COMMAND}`"
        ) from error
    _register_python_kernels()


@contextlib.contextmanager
def _build_environment(home: str, arches: str) -> Iterator[None]:
    """CUDA_HOME and TORCH_CUDA_ARCH_LIST for the duration of a build, restored afterwards.

    torch.utils.cpp_extension reads CUDA_HOME once, when it is first imported; its module
    variable is set too, for a process that imported it before CUDA_HOME was known.
    """
    from torch.utils import cpp_extension

    saved_env = {name: os.environ.get(name) for name in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    saved_home = cpp_extension.CUDA_HOME
    os.environ["CUDA_HOME"] = home
    os.environ["TORCH_CUDA_ARCH_LIST"] = arches
    cpp_extension.CUDA_HOME = home
    try:
        yield
    finally:
        cpp_extension.CUDA_HOME = saved_home
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _build(directory: Path, verbose: bool) -> Extension:
    from torch.utils import cpp_extension

    retry = f"retry with `CUDA_HOME=/path/to/cuda {BUILD_COMMAND} --verbose`"
    if not torch.version.cuda:
        raise ExtensionUnavailable(
            f"this torch ({torch.__version__}) is built without CUDA, so the mfnet_ext CUDA "
            "extension cannot be compiled against it; install a CUDA build of torch"
        )
    home = cuda_home()
    if home is None or not Path(home, "bin", "nvcc").is_file():
        raise ExtensionUnavailable(
            "no CUDA compiler to build the mfnet_ext extension: "
            + (
                "CUDA_HOME is not set and /usr/local/cuda does not exist"
                if home is None
                else f"{Path(home, 'bin', 'nvcc')} does not exist"
            )
            + f"; set CUDA_HOME to the CUDA toolkit (the folder holding bin/nvcc) and {retry}"
        )
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as error:
        raise ExtensionUnavailable(
            f"building the mfnet_ext extension needs ninja ({error}): `pip install ninja`, then "
            f"{retry}"
        ) from error
    arches = arch_list()
    directory.mkdir(parents=True, exist_ok=True)
    log.warning(
        "compiling the mfnet_ext CUDA extension (first use of these sources: 1-3 minutes) "
        "into %s with CUDA_HOME=%s, TORCH_CUDA_ARCH_LIST=%s",
        directory,
        home,
        arches,
    )
    started = time.perf_counter()
    try:
        with _build_environment(home, arches):
            cpp_extension.load(
                name=LIBRARY_NAME,
                sources=[str(path) for path in sources()],
                extra_cflags=list(EXTRA_CFLAGS),
                extra_cuda_cflags=list(EXTRA_CUDA_CFLAGS),
                build_directory=str(directory),
                verbose=verbose,
                with_cuda=True,
                is_python_module=False,
            )
    except (RuntimeError, OSError, ValueError, ImportError) as error:
        raise ExtensionUnavailable(
            f"building the mfnet_ext extension in {directory} failed "
            f"({type(error).__name__}: {error}); {retry}"
        ) from error
    seconds = time.perf_counter() - started
    _register_python_kernels()
    log.warning("mfnet_ext compiled in %.0f s: %s", seconds, directory)
    return Extension("jit", str(directory / f"{LIBRARY_NAME}.so"), seconds)


@functools.cache
def _register_python_kernels() -> None:
    """Call ``register_python_kernels()`` of every public module of the package that has one
    (``masked_pooling``, ``triplet_sampling``, ...: fake kernels, autograd), once per process,
    after the library is loaded."""
    names = sorted(
        info.name
        for info in pkgutil.iter_modules([str(PACKAGE_DIR)])
        if not info.name.startswith("_")
    )
    for name in names:
        module = importlib.import_module(f"{NAMESPACE}.{name}")
        register = getattr(module, "register_python_kernels", None)
        if register is not None:
            register()
