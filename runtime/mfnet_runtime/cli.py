"""``python -m mfnet_runtime segment``: segment a video, camera, image folder or image with
exported engines and a support set given as a SPEC (``docs/support_spec.md``).

Bad inputs (a malformed SPEC, an unreadable video, a camera that does not open, engines that do
not match) end with exit code 2 and one ``error: ...`` line on stderr. The input/output
options, the frame loop and its report are ``pipeline``'s, shared with ``mfnet.predict`` (the
PyTorch twin).
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
from .spec import load_support_spec
from .threads import thread_policy

# What the runtime's commands report as one line (exit 2); anything else is a bug.
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
    segment.add_argument(
        "--engines",
        required=True,
        metavar="DIR",
        type=options.directory_path,
        help="folder of exported engines with their manifest.json "
        "(python -m mfnet.export onnx|trt)",
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
    add_demo_parser(commands)
    return parser


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
    """The ``segment`` command; raises ``RuntimeInputError`` / ``EngineError`` on bad inputs."""
    policy = thread_policy(args.threads)
    print(policy.describe())
    segmenter = Segmenter.load(
        args.engines,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        threads=policy.threads,
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
    return demo_command(args) if args.command == "demo" else segment_command(args)
