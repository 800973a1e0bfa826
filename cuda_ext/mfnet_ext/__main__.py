"""``python -m mfnet_ext build|info``: compile the extension into the cache, or report on it.

build: just-in-time compile of every csrc/*.cpp and csrc/*.cu (CUDA_HOME defaults to
/usr/local/cuda, TORCH_CUDA_ARCH_LIST to the visible GPUs or 9.0) into the build cache, then load
it; exit code 2 with the cause when it cannot (no nvcc, no CUDA torch, a compile error).
info: versions, toolkit, arch list, build folder, and whether a built library is there; builds
nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from . import _loader


def _info(root: str | None) -> dict:
    library = _loader.library_path(root)
    home = _loader.cuda_home()
    try:
        import mfnet_ext._C  # noqa: F401

        aot = "installed"
    except ModuleNotFoundError:
        aot = "not built"
    except ImportError as error:
        aot = f"present but not loadable: {error}"
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cuda_home": home,
        "nvcc": str(Path(home, "bin", "nvcc")) if home else None,
        "nvcc_found": bool(home) and Path(home, "bin", "nvcc").is_file(),
        "arch_list": _loader.arch_list(),
        "sources": [path.name for path in _loader.sources()],
        "aot_module": aot,
        "build_directory": str(library.parent),
        "jit_library_built": library.is_file(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mfnet_ext",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("build", "info"))
    parser.add_argument(
        "--build-root",
        default=None,
        help="root of the just-in-time builds (default: $MFNET_EXT_BUILD_DIR or "
        "~/.cache/mfnet_ext)",
    )
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.command == "info":
        print(json.dumps(_info(args.build_root), indent=2))
        return 0
    try:
        extension = _loader.load(compile=True, build_root=args.build_root, verbose=args.verbose)
    except _loader.ExtensionUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    prefix = f"{_loader.NAMESPACE}::"
    ops = sorted(
        name[len(prefix) :]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith(prefix)
    )
    seconds = "" if extension.build_seconds is None else f" in {extension.build_seconds:.0f} s"
    print(f"mfnet_ext ready ({extension.origin}{seconds}): {extension.path or 'already loaded'}")
    print(f"operators: torch.ops.mfnet_ext.{{{', '.join(ops)}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
