"""python export/to_trt.py --onnx-dir DIR [--fp16] [--max-batch B]

Build TensorRT engines (support encoder, prototype aggregator(s), query decoder) from an ONNX
export directory written by export/to_onnx.py, on the GPU they will run on. TensorRT before
10.12 builds FP16 engines from the FP32 graphs with the FP16 builder flag; from 10.12 (which
deprecated the flag) and on 11 they are built strongly typed from the FP16 graphs. Engine files are named by GPU model, compute capability,
TensorRT version, precision and shape range, and recorded in DIR/manifest.json; a persistent
timing cache (DIR/timing_cache.trt<version>.bin) makes rebuilds fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from mfnet.errors import mfnet_command  # noqa: E402
from mfnet.export.tensorrt import TensorRTUnavailable, build_engines  # noqa: E402
from mfnet_runtime import options  # noqa: E402


@mfnet_command(TensorRTUnavailable)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python export/to_trt.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx-dir", required=True, type=options.directory_path,
                        help="export directory")
    parser.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                        default="fp32", help="build FP16 engines (default: FP32)")
    parser.add_argument("--precision", choices=["fp32", "fp16"], dest="precision",
                        help="the same as --fp16 / its absence")
    parser.add_argument("--max-batch", type=options.positive_int, default=None,
                        help="largest query batch of the decoder profile (default: the export's)")
    parser.add_argument("--opt-batch", type=options.positive_int, default=1,
                        help="batch the decoder is tuned for (1 = per-frame video)")
    parser.add_argument("--workspace-gb", type=options.number(0, exclusive_minimum=True), default=4.0, help="builder workspace")
    args = parser.parse_args(argv)
    build_engines(args.onnx_dir, args.precision, opt_batch=args.opt_batch,
                  max_batch=args.max_batch, workspace_bytes=int(args.workspace_gb * (1 << 30)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
