"""python benchmarks/demo_iou.py --engines DIR [--scenes 60] [--classes dots checker]

How well an export segments the demo's classes: the runtime's demo support set (one shot per
class, as ``python -m mfnet_runtime demo`` writes it) encoded once, then IoU per class over
``--scenes`` query images drawn like the demo's (their ground truth comes with them). For the
default checkpoint this checks that the demo a newcomer runs shows classes the model segments
well. torch-free: the runtime and its ONNX Runtime backend only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np

from mfnet_runtime import Segmenter
from mfnet_runtime.demo import DEFAULT_CLASSES, LOOKS, query_scene, write_demo
from mfnet_runtime.spec import load_support_spec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/demo_iou.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--engines", required=True, help="an export (python -m mfnet.export onnx)")
    parser.add_argument("--scenes", type=int, default=60, help="query scenes (default 60)")
    parser.add_argument(
        "--classes",
        nargs="+",
        default=list(DEFAULT_CLASSES),
        choices=list(LOOKS),
        help="demo classes, as many as the model's way (default: dots checker)",
    )
    parser.add_argument("--seed", type=int, default=123, help="seed of the query scenes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Encode the demo's support set, segment the scenes, print IoU per class."""
    args = parse_args(argv)
    classes = tuple(args.classes)
    segmenter = Segmenter.load(args.engines, backend="onnxruntime", device="cpu")
    with tempfile.TemporaryDirectory() as scratch:
        files = write_demo(scratch, classes, images=0, frames=1, use_opencv=False)
        support = segmenter.encode_support(load_support_spec(files.support))
    rng = np.random.default_rng(args.seed)
    counts = np.zeros((3, len(classes) + 1))  # rows: true positives, false positives, misses
    for index in range(args.scenes):
        image, truth = query_scene(rng, classes, index, 144, 192)
        labels = segmenter.segment(image, support)
        for label in range(len(classes) + 1):
            predicted, actual = labels == label, truth == label
            counts[:, label] += [(predicted & actual).sum(), (predicted & ~actual).sum(),
                                 (~predicted & actual).sum()]  # fmt: skip
    iou = 100 * counts[0] / np.maximum(counts.sum(0), 1)
    names = ("background", *classes)
    print(
        f"{args.scenes} scenes: IoU "
        + ", ".join(f"{name} {value:.1f}" for name, value in zip(names, iou, strict=True))
        + f"; mean over the classes {iou[1:].mean():.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
