"""python export/to_triton.py ARGS: ``python -m mfnet.export triton ARGS`` (see --help)."""

import sys

from mfnet.export.command import main as export_main


def main(argv: list[str] | None = None) -> int:
    """``python -m mfnet.export triton`` with ``argv`` (default: this script's arguments)."""
    return export_main(["triton", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
