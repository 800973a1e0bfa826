"""``python -m mfnet.export onnx|trt|verify|triton``: the command line (see ``command.py``)."""

from __future__ import annotations

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
