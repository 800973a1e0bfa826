"""``python -m benchmarks.inference``: the inference benchmark's command line (``cli.main``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m benchmarks.inference"))
