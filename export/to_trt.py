"""python export/to_trt.py ARGS: the same as ``python -m mfnet.export trt ARGS`` (see --help)."""

import sys

from mfnet.export.command import main as export_main


def main(argv: list[str] | None = None) -> int:
    """``python -m mfnet.export trt`` with ``argv`` (default: this script's arguments)."""
    return export_main(["trt", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
