"""``python -m mfnet.export onnx|trt|verify|triton``: the export command of an installed mfnet.

``onnx`` exports a checkpoint to verified ONNX graphs and a manifest, ``trt`` adds TensorRT
engines to such an export on the GPU they will run on, ``verify`` re-runs the parity check of
an export, ``triton`` writes a Triton Inference Server model repository from an export.
``python export/to_onnx.py``, ``export/to_trt.py``, ``export/verify.py`` and
``export/to_triton.py`` in a source checkout are the same sub-commands. One error boundary
(``mfnet.errors.mfnet_command``): bad options, checkpoints or paths end with one ``error: ...``
line and exit code 2; a failed verification exits with 1 (docs/errors.md).
"""

from __future__ import annotations

import argparse
import sys

from mfnet_runtime import options
from mfnet_runtime.console import configure_logging
from mfnet_runtime.errors import EngineError
from mfnet_runtime.manifest import read_manifest, sha256_of, verify_files
from mfnet_runtime.triton_repository import RepositoryOptions, write_repository

from ..checkpoint import model_from_checkpoint
from ..errors import error_line, mfnet_command, require_export_dependencies
from .onnx_export import DEFAULT_OPSET, ExportError, ExportLimits, export_onnx
from .tensorrt import TensorRTUnavailable, build_engines
from .verify import verify_export

PROG = "python -m mfnet.export"
EXIT_VERIFICATION_FAILED = 1

ONNX_DESCRIPTION = """\
python -m mfnet.export onnx --checkpoint CKPT --out DIR
(the same: python export/to_onnx.py --checkpoint CKPT --out DIR)

Split a trained MFNet checkpoint into a support encoder, a prototype aggregator and a query
decoder, export each to ONNX (FP32 and FP16 with float32 I/O), verify every graph against
PyTorch with ONNX Runtime, and write DIR/manifest.json. A failed verification fails the export
(exit code 1) and prints the report; DIR is then left as it was (a new export is written
beside it and replaces it only once complete and verified). Bad options, checkpoints or paths
end with one ``error: ...`` line and exit code 2 (docs/errors.md).
"""

TRT_DESCRIPTION = """\
python -m mfnet.export trt --onnx-dir DIR [--fp16] [--max-batch B]
(the same: python export/to_trt.py --onnx-dir DIR ...)

Build TensorRT engines (support encoder, prototype aggregator(s), query decoder) from an ONNX
export directory written by python -m mfnet.export onnx, on the GPU they will run on. TensorRT
before 10.12 builds FP16 engines from the FP32 graphs with the FP16 builder flag; from 10.12
(which deprecated the flag) and on 11 they are built strongly typed from the FP16 graphs.
Engine files are named by GPU model, compute capability, TensorRT version, precision and shape
range, and recorded in DIR/manifest.json; a persistent timing cache
(DIR/timing_cache.trt<version>.bin) makes rebuilds fast.
"""

VERIFY_DESCRIPTION = """\
python -m mfnet.export verify --dir DIR --checkpoint CKPT [--provider cpu|cuda]
(the same: python export/verify.py --dir DIR --checkpoint CKPT)

Re-run the parity check of an export directory: file hashes against the manifest, the
checkpoint against the manifest's SHA-256, then every ONNX graph with ONNX Runtime against the
PyTorch model (tolerances in mfnet/export/verify.py). Exit code 0 when everything passes.
"""

TRITON_DESCRIPTION = """\
python -m mfnet.export triton --engines DIR --out REPO [--kind gpu|cpu] [--instances N]
(the same: python export/to_triton.py --engines DIR --out REPO ...)

Write a model repository for NVIDIA Triton Inference Server (tritonserver
--model-repository=REPO) from an export directory: mfnet_encode_support (support encoder),
mfnet_aggregate_prototypes (+ _single for models with A_S) and mfnet_segment (query decoder,
prototypes per frame, dynamic batching), each a config.pbtxt and the graph, as onnxruntime_onnx
or, where DIR holds TensorRT engines of the precision, tensorrt_plan. REPO is replaced only
once the new repository is complete. See docs/serving.md.
"""

PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
}


def _add_onnx_parser(commands: argparse._SubParsersAction) -> None:
    """The ``onnx`` sub-command's options."""
    parser = commands.add_parser(
        "onnx",
        help="export a checkpoint to verified ONNX graphs",
        description=ONNX_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=options.file_path,
        help="checkpoint written by mfnet.train",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=options.output_directory,
        help="output directory (new, empty, or an earlier export, which is "
        "replaced only once the new export is complete and verified)",
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32", "fp16"],
        choices=["fp32", "fp16"],
        help="graph precisions (default: fp32 fp16)",
    )
    parser.add_argument(
        "--max-batch",
        type=options.positive_int,
        default=ExportLimits.max_batch,
        help="largest query batch (dynamic batch axis upper bound)",
    )
    parser.add_argument(
        "--max-support",
        type=options.positive_int,
        default=ExportLimits.max_support,
        help="largest number of support images per encoder call",
    )
    parser.add_argument(
        "--max-shots",
        type=options.positive_int,
        default=ExportLimits.max_shots,
        help="largest number of shots per class in the aggregator",
    )
    parser.add_argument(
        "--opset", type=options.integer(minimum=7), default=DEFAULT_OPSET, help="ONNX opset"
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the ONNX Runtime parity check (not recommended)",
    )
    parser.add_argument(
        "--no-optimize",
        dest="optimize",
        action="store_false",
        help="export the query decoder in its plain form (decode_query as it is) "
        "instead of the exact optimised rewrite (static pooling, prototype "
        "folding; see benchmarks/OPTIMISATION.md), for comparison",
    )


def _add_trt_parser(commands: argparse._SubParsersAction) -> None:
    """The ``trt`` sub-command's options."""
    parser = commands.add_parser(
        "trt",
        help="build TensorRT engines from an ONNX export",
        description=TRT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--onnx-dir", required=True, type=options.directory_path, help="export directory"
    )
    parser.add_argument(
        "--fp16",
        dest="precision",
        action="store_const",
        const="fp16",
        default="fp32",
        help="build FP16 engines (default: FP32)",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        dest="precision",
        help="the same as --fp16 / its absence",
    )
    parser.add_argument(
        "--max-batch",
        type=options.positive_int,
        default=None,
        help="largest query batch of the decoder profile (default: the export's)",
    )
    parser.add_argument(
        "--opt-batch",
        type=options.positive_int,
        default=1,
        help="batch the decoder is tuned for (1 = per-frame video)",
    )
    parser.add_argument(
        "--workspace-gb",
        type=options.number(0, exclusive_minimum=True),
        default=4.0,
        help="builder workspace",
    )


def _add_verify_parser(commands: argparse._SubParsersAction) -> None:
    """The ``verify`` sub-command's options."""
    parser = commands.add_parser(
        "verify",
        help="re-run the parity check of an export",
        description=VERIFY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dir", required=True, type=options.directory_path, help="export directory"
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=options.file_path,
        help="the checkpoint it was exported from",
    )
    parser.add_argument(
        "--provider",
        choices=sorted(PROVIDERS),
        default="cpu",
        help="ONNX Runtime execution provider (default: cpu)",
    )


def _add_triton_parser(commands: argparse._SubParsersAction) -> None:
    """The ``triton`` sub-command's options (``RepositoryOptions``)."""
    parser = commands.add_parser(
        "triton",
        help="write a Triton Inference Server model repository from an export",
        description=TRITON_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--engines", required=True, type=options.directory_path, help="export directory"
    )
    parser.add_argument(
        "--out",
        required=True,
        type=options.output_directory,
        help="repository directory (new, empty, or an earlier repository, which is replaced "
        "only once the new one is complete)",
    )
    defaults = RepositoryOptions()
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "fp16"],
        default=defaults.precision,
        help="graph precision (auto: fp16 for GPU instances when exported, else fp32)",
    )
    parser.add_argument(
        "--platform",
        choices=["auto", "onnxruntime", "tensorrt"],
        default=defaults.platform,
        help="auto: tensorrt_plan where DIR has TensorRT engines of the precision, else "
        "onnxruntime_onnx",
    )
    parser.add_argument(
        "--kind", choices=["gpu", "cpu"], default=defaults.kind, help="instance kind"
    )
    parser.add_argument(
        "--instances",
        type=options.positive_int,
        default=defaults.instances,
        help="model instances per GPU (or on the CPU)",
    )
    parser.add_argument(
        "--gpus",
        type=options.integer(minimum=0),
        nargs="+",
        default=[],
        help="GPU indices of the instances (default: every visible GPU)",
    )
    parser.add_argument(
        "--max-batch",
        type=options.positive_int,
        default=None,
        help="max_batch_size of the batched models (default and upper bound: the export's)",
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=options.integer(minimum=0),
        default=defaults.max_queue_delay_us,
        help="dynamic batcher: the longest a request waits for others (microseconds)",
    )
    parser.add_argument(
        "--preferred-batch-sizes",
        type=options.positive_int,
        nargs="+",
        default=[],
        help="dynamic batcher of mfnet_segment (default: 4, 8, ... up to max_batch_size)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m mfnet.export`` and its four sub-commands."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_onnx_parser(commands)
    _add_trt_parser(commands)
    _add_verify_parser(commands)
    _add_triton_parser(commands)
    return parser


def onnx_command(args: argparse.Namespace) -> int:
    """Export, verify, write the manifest; 1 when the verification failed."""
    limits = ExportLimits(args.max_batch, args.max_support, args.max_shots)
    try:
        export_onnx(
            args.checkpoint,
            args.out,
            precisions=tuple(args.precisions),
            limits=limits,
            opset=args.opset,
            verify=args.verify,
            optimize=args.optimize,
        )
    except ExportError as error:  # the export ran and failed its verification
        print(error_line(error), file=sys.stderr)
        return EXIT_VERIFICATION_FAILED
    return 0


def trt_command(args: argparse.Namespace) -> int:
    """Build the engines into the export directory."""
    build_engines(
        args.onnx_dir,
        args.precision,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        workspace_bytes=int(args.workspace_gb * (1 << 30)),
    )
    return 0


def verify_command(args: argparse.Namespace) -> int:
    """Hashes, the checkpoint's SHA-256, then the parity of every graph; 1 when one fails."""
    require_export_dependencies()
    manifest = read_manifest(args.dir)
    verify_files(manifest, list(manifest.graphs))
    model, _ = model_from_checkpoint(args.checkpoint)
    if manifest.checkpoint is None or sha256_of(args.checkpoint) != manifest.checkpoint.sha256:
        raise EngineError(
            f"{args.checkpoint} is not the checkpoint this directory was "
            "exported from (SHA-256 differs)"
        )
    report = verify_export(manifest, model, providers=PROVIDERS[args.provider])
    print("PASSED" if report["passed"] else "FAILED")
    return 0 if report["passed"] else EXIT_VERIFICATION_FAILED


def triton_command(args: argparse.Namespace) -> int:
    """Write the model repository."""
    repository_options = RepositoryOptions(
        precision=args.precision,
        platform=args.platform,
        kind=args.kind,
        instances=args.instances,
        gpus=tuple(args.gpus),
        max_batch=args.max_batch,
        max_queue_delay_us=args.max_queue_delay_us,
        preferred_batch_sizes=tuple(args.preferred_batch_sizes),
    )
    for plan in write_repository(args.engines, args.out, repository_options):
        print(f"{plan.name}: {plan.platform}, max_batch_size {plan.max_batch_size}")
    return 0


COMMANDS = {
    "onnx": onnx_command,
    "trt": trt_command,
    "verify": verify_command,
    "triton": triton_command,
}


@mfnet_command(TensorRTUnavailable)
def main(argv: list[str] | None = None) -> int:
    """``python -m mfnet.export COMMAND ...``; the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging()  # the library's progress lines ("exporting ...") on stdout
    return COMMANDS[args.command](args)
