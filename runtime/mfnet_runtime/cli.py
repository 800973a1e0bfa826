"""``python -m mfnet_runtime segment``: segment a video, camera, image folder or image with
exported engines (or an inference server, ``--server``) and a support set given as a SPEC
(``docs/support_spec.md``); ``serve``: serve exported engines with Triton Inference Server
(``serving/``, ``docs/serving.md``); ``demo``: inputs to try them on.

Bad inputs (a malformed SPEC, an unreadable video, a camera that does not open, engines that do
not match, a server that cannot be reached) end with exit code 2 and one ``error: ...`` line on
stderr. The input/output options, the frame loop and its report are ``pipeline``'s, shared with
``mfnet.predict`` (the PyTorch twin).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from . import options
from .boundary import command_boundary
from .demo import DEFAULT_CLASSES, LOOKS, next_commands, write_demo
from .errors import EngineError, MissingDependencyError, RuntimeInputError
from .pipeline import add_io_arguments, run_and_report
from .segmenter import Segmenter
from .serving.client import PROTOCOLS, RemoteSegmenter
from .spec import load_support_spec
from .threads import add_threads_argument, thread_policy

# What the runtime's commands report as one line (exit 2); anything else is a bug.
# (ServerError, a server that cannot be used, is an EngineError)
RUNTIME_ERRORS = (RuntimeInputError, EngineError, MissingDependencyError, OSError)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m mfnet_runtime`` and its commands."""
    parser = argparse.ArgumentParser(
        prog="python -m mfnet_runtime",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    segment = commands.add_parser(
        "segment",
        help="segment a video, camera, image folder or image",
        description="Segment every frame of SRC into the support set's classes and write "
        "label maps and overlays. Prints frames, seconds, frames per second and "
        "the backend at the end.",
    )
    where = segment.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--engines",
        metavar="DIR",
        type=options.directory_path,
        help="folder of exported engines with their manifest.json "
        "(python -m mfnet.export onnx|trt)",
    )
    where.add_argument(
        "--server",
        metavar="URL",
        help="segment on an MFNet inference server instead (python -m mfnet_runtime serve): "
        "host:port of its HTTP endpoint, or of its gRPC one with --protocol grpc",
    )
    segment.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="http",
        help="how to talk to --server (default http)",
    )
    segment.add_argument(
        "--timeout",
        type=options.number(0, exclusive_minimum=True),
        default=30.0,
        metavar="S",
        help="seconds any --server call may wait before it fails (default 30)",
    )
    support = segment.add_mutually_exclusive_group(required=True)
    support.add_argument(
        "--support",
        metavar="SPEC",
        help="support set: a folder with one sub-folder of images and "
        "<image>.mask.png masks per class, or a JSON file "
        "(docs/support_spec.md); as many classes as the engines' way",
    )
    support.add_argument(
        "--load-support",
        metavar="FILE",
        type=options.existing_file,
        help="an encoded support set written earlier with --save-support "
        "(skips encoding; must come from the same engines)",
    )
    segment.add_argument(
        "--save-support",
        metavar="FILE",
        type=options.output_file,
        help="also save the encoded support set to FILE for --load-support",
    )
    add_io_arguments(segment)
    segment.add_argument(
        "--backend",
        choices=("auto", "onnxruntime", "tensorrt"),
        default="auto",
        help="inference backend; auto = TensorRT engines if present and "
        "usable, else ONNX Runtime (default auto)",
    )
    segment.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto = CUDA when available, else CPU (default auto)",
    )
    segment.add_argument(
        "--precision",
        choices=("auto", "fp32", "fp16"),
        default="auto",
        help="engine precision; auto = fp16 on CUDA when exported, else fp32 (default auto)",
    )
    segment.add_argument(
        "--group-classes",
        action="store_true",
        help="take any number of support classes (up to 254): those that do not fit the "
        "engines' slots are decoded in groups and merged per pixel (local engines only)",
    )
    add_demo_parser(commands)
    add_serve_parser(commands)
    return parser


def add_serve_parser(commands: Any) -> None:
    """The ``serve`` command: the engines behind Triton Inference Server (``serving``)."""
    serve = commands.add_parser(
        "serve",
        help="serve exported engines with NVIDIA Triton Inference Server (PyTriton)",
        description="Serve the engines of DIR as the Triton models mfnet_info, "
        "mfnet_encode_support and mfnet_segment (dynamic batching across streams) over "
        "HTTP and gRPC, with Prometheus metrics; prints one 'serving: ...' line when ready; "
        "SIGTERM or Ctrl-C stops it after the requests in flight (docs/serving.md). "
        "Needs pip install 'mfnet-runtime[serve]'.",
    )
    serve.add_argument(
        "--engines",
        required=True,
        metavar="DIR",
        type=options.directory_path,
        help="folder of exported engines with their manifest.json",
    )
    for name, default in (("http", 8000), ("grpc", 8001), ("metrics", 8002)):
        serve.add_argument(
            f"--{name}-port",
            type=options.integer(1, 65535),
            default=default,
            metavar="PORT",
            help=f"{name} port (default {default})",
        )
    serve.add_argument(
        "--address",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    serve.add_argument(
        "--max-batch",
        type=options.positive_int,
        default=16,
        metavar="B",
        help="most frames mfnet_segment decodes in one execution (default 16)",
    )
    serve.add_argument(
        "--queue-delay-us",
        type=options.non_negative_int,
        default=500,
        metavar="US",
        help="microseconds the dynamic batcher waits for more requests (default 500)",
    )
    serve.add_argument(
        "--instances",
        type=options.positive_int,
        default=1,
        metavar="N",
        help="mfnet_segment model instances, each with its own sessions; the threads are "
        "split between them (default 1)",
    )
    serve.add_argument(
        "--exit-timeout",
        type=options.non_negative_int,
        default=30,
        metavar="S",
        help="seconds the requests in flight get to finish on SIGTERM (default 30)",
    )
    serve.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), default="auto")
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    serve.add_argument("--precision", choices=("auto", "fp32", "fp16"), default="auto")
    serve.add_argument(
        "--log-verbose",
        type=options.non_negative_int,
        default=0,
        metavar="LEVEL",
        help="Triton's verbose log level (default 0)",
    )
    serve.add_argument(
        "--triton-log",
        type=options.output_file,
        default=None,
        metavar="FILE",
        help="write Triton's own log to FILE (default: on stdout)",
    )
    add_threads_argument(serve)


def serve_command(args: argparse.Namespace) -> int:
    """The ``serve`` command: runs until SIGTERM / Ctrl-C."""
    from .serving.server import ServeOptions, serve

    return serve(
        ServeOptions(
            engines=args.engines,
            backend=args.backend,
            device=args.device,
            precision=args.precision,
            threads=args.threads,
            address=args.address,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            max_batch=args.max_batch,
            queue_delay_us=args.queue_delay_us,
            instances=args.instances,
            exit_timeout=args.exit_timeout,
            log_verbose=args.log_verbose,
            triton_log=args.triton_log,
        )
    )


def add_demo_parser(commands: Any) -> None:
    """The ``demo`` command: inputs to try the runtime on (``demo.py``)."""
    demo = commands.add_parser(
        "demo",
        help="write a support SPEC, query images and a video to try segment on",
        description="Write DIR/support/ (a support SPEC, docs/support_spec.md), DIR/images/ "
        "(query images) and DIR/video.mp4 (DIR/video_frames/ without OpenCV), "
        "drawn with the looks of the synthetic benchmark's novel classes of fold 0, "
        "which the default checkpoint of python -m mfnet.train never saw in "
        "training; then print the commands that export that checkpoint and segment "
        "the video. numpy and Pillow only (OpenCV for the video).",
    )
    demo.add_argument("--out", required=True, metavar="DIR", help="folder to write into")
    demo.add_argument(
        "--classes",
        nargs="+",
        default=list(DEFAULT_CLASSES),
        choices=list(LOOKS),
        metavar="NAME",
        help=f"the classes, as many as the model's way ({', '.join(LOOKS)}; "
        f"default: {' '.join(DEFAULT_CLASSES)})",
    )
    demo.add_argument("--frames", type=int, default=48, help="video frames (default 48)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def demo_command(args: argparse.Namespace) -> int:
    """The ``demo`` command: write the files, print where they are and what to run next."""
    if args.frames < 1:
        raise RuntimeInputError(f"--frames must be >= 1, got {args.frames}")
    files = write_demo(args.out, tuple(args.classes), frames=args.frames, seed=args.seed)
    print(f"support SPEC: {files.support} ({', '.join(files.classes)}, one shot each)")
    print(f"query images: {files.images}")
    if files.video_is_folder:
        print(
            f"video frames: {files.video} (OpenCV is not installed, so no video file was "
            "written; pip install 'mfnet-runtime[video]' for one)"
        )
    else:
        print(f"video: {files.video}")
    print("next:")
    for command in next_commands(files):
        print(f"  {command}")
    return 0


def segment_command(args: argparse.Namespace) -> int:
    """The ``segment`` command; raises ``RuntimeInputError`` / ``EngineError`` on bad inputs,
    ``ServerError`` when ``--server`` cannot be used."""
    segmenter: Segmenter | RemoteSegmenter
    if args.server is not None:
        if args.group_classes:
            raise RuntimeInputError(
                "--group-classes runs on local engines (--engines DIR); a server decodes the "
                "number of classes its engines were exported for"
            )
        segmenter = RemoteSegmenter(args.server, protocol=args.protocol, timeout=args.timeout)
        print(f"server: {segmenter.url} ({args.protocol}), {segmenter.info.backend} engines")
    else:
        policy = thread_policy(args.threads)
        print(policy.describe())
        segmenter = Segmenter.load(
            args.engines,
            backend=args.backend,
            device=args.device,
            precision=args.precision,
            threads=policy.threads,
            group_classes=args.group_classes,
        )
    started = time.perf_counter()
    if args.load_support is not None:
        support = segmenter.load_support(args.load_support)
        how = f"loaded from {args.load_support}"
    else:
        support = segmenter.encode_support(load_support_spec(args.support), color="rgb")
        how = f"encoded from {args.support}"
    print(
        f"support: {len(support.class_names)} classes ({', '.join(support.class_names)}) "
        f"{how} in {time.perf_counter() - started:.2f} s"
    )
    if args.save_support is not None:
        support.save(args.save_support)
        print(f"saved the support set to {args.save_support}")
    return run_and_report(
        segmenter, support, args, f"{segmenter.backend_name} ({segmenter.precision})"
    )


@command_boundary(*RUNTIME_ERRORS)
def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; the exit code (2: one ``error:`` line)."""
    args = build_parser().parse_args(argv)
    commands = {"demo": demo_command, "serve": serve_command, "segment": segment_command}
    return commands[args.command](args)
