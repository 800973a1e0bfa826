"""python export/to_onnx.py --checkpoint CKPT --out DIR

Split a trained MFNet checkpoint into a support encoder, a prototype aggregator and a query
decoder, export each to ONNX (FP32 and FP16 with float32 I/O), verify every graph against
PyTorch with ONNX Runtime, and write DIR/manifest.json. A failed verification fails the export
(exit code 1) and prints the report; DIR is then left as it was (a new export is written
beside it and replaces it only once complete and verified). Bad options, checkpoints or paths
end with one ``error: ...`` line and exit code 2 (docs/errors.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from mfnet.errors import error_line, mfnet_command  # noqa: E402
from mfnet.export.onnx_export import DEFAULT_OPSET, ExportError, ExportLimits, export_onnx  # noqa: E402
from mfnet_runtime import options  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python export/to_onnx.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=options.file_path,
                        help="checkpoint written by mfnet.train")
    parser.add_argument("--out", required=True, type=options.output_directory,
                        help="output directory (new, empty, or an earlier export, which is "
                             "replaced only once the new export is complete and verified)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16"],
                        choices=["fp32", "fp16"], help="graph precisions (default: fp32 fp16)")
    parser.add_argument("--max-batch", type=options.positive_int, default=ExportLimits.max_batch,
                        help="largest query batch (dynamic batch axis upper bound)")
    parser.add_argument("--max-support", type=options.positive_int, default=ExportLimits.max_support,
                        help="largest number of support images per encoder call")
    parser.add_argument("--max-shots", type=options.positive_int, default=ExportLimits.max_shots,
                        help="largest number of shots per class in the aggregator")
    parser.add_argument("--opset", type=options.integer(minimum=7), default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the ONNX Runtime parity check (not recommended)")
    parser.add_argument("--no-optimize", dest="optimize", action="store_false",
                        help="export the query decoder in its plain form (decode_query as it is) "
                             "instead of the exact optimised rewrite (static pooling, prototype "
                             "folding; see benchmarks/OPTIMISATION.md), for comparison")
    return parser


@mfnet_command()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    limits = ExportLimits(args.max_batch, args.max_support, args.max_shots)
    try:
        export_onnx(args.checkpoint, args.out, precisions=tuple(args.precisions), limits=limits,
                    opset=args.opset, verify=args.verify, optimize=args.optimize)
    except ExportError as error:  # the export ran and failed its verification
        print(error_line(error), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
