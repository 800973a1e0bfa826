"""Script form of the inference benchmark ``benchmarks.inference`` (``--help`` describes it).

    python benchmarks/bench_inference.py --device cuda      # = python -m benchmarks.inference

Runnable from any folder of a plain checkout: it puts the repository root (``benchmarks``,
``mfnet``) and ``runtime/`` (``mfnet_runtime``) on the import path first.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "runtime", REPO):  # REPO ends up first
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from benchmarks.inference.cli import main  # noqa: E402
from benchmarks.inference.variants import VARIANTS  # noqa: E402,F401 - the rows, for callers

if __name__ == "__main__":
    raise SystemExit(main())
