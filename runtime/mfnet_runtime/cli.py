"""``python -m mfnet_runtime segment``: segment a video, camera, image folder or image with
exported engines and a support set given as a SPEC (``docs/support_spec.md``).

Bad inputs (a malformed SPEC, an unreadable video, a camera that does not open, engines that do
not match) end with exit code 2 and one ``error: ...`` line on stderr. ``mfnet.predict`` (the
PyTorch twin) reuses the input/output options, the progress bar and the report defined here.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

from . import options
from .boundary import EXIT_INPUT_ERROR, EXIT_INTERRUPTED, command_boundary, error_line
from .errors import EngineError, MissingDependencyError, RuntimeInputError
from .spec import load_support_spec
from .threads import add_threads_argument, thread_policy
from .video import DEFAULT_FPS, VIDEO_OUTPUT_EXTENSIONS, open_source, segment_video

__all__ = ["EXIT_INPUT_ERROR", "EXIT_INTERRUPTED", "RUNTIME_ERRORS", "add_io_arguments",
           "error_line", "main", "run_and_report"]
# What the runtime's commands report as one line (exit 2); anything else is a bug.
RUNTIME_ERRORS = (RuntimeInputError, EngineError, MissingDependencyError, OSError)


class Progress:
    """A frame counter on stderr. On a terminal: tqdm's bar when tqdm is installed, else a
    plain line rewritten at most twice a second. Elsewhere (a log file, a pipe): one complete,
    newline-terminated line per update, at most one a second, and the last one. ``total`` is
    None for endless sources (cameras)."""

    def __init__(self, total: int | None, description: str, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.total, self.description, self.enabled = total, description, enabled
        self.stream = stream or sys.stderr
        self.count, self._last_draw, self._drawn = 0, 0.0, 0
        self._bar: Any = None
        isatty = getattr(self.stream, "isatty", None)
        self._terminal = bool(isatty and isatty())
        self._interval = 0.5 if self._terminal else 1.0
        if enabled and self._terminal:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=description, unit="frame", file=self.stream,
                                 dynamic_ncols=True)

    def update(self, frames: int = 1) -> None:
        self.count += frames
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(frames)
            return
        now = time.monotonic()
        if now - self._last_draw >= self._interval or self.count == self.total:
            self._last_draw = now
            self._draw()

    def _draw(self) -> None:
        of = f"/{self.total}" if self.total else ""
        line = f"{self.description}: {self.count}{of} frames"
        self.stream.write(f"\r{line}" if self._terminal else f"{line}\n")
        self.stream.flush()
        self._drawn = self.count

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        elif self._terminal and self.count:
            self.stream.write("\n")
            self.stream.flush()
        elif self.count and self._drawn != self.count:
            self._draw()  # the final count (a stop before the end, or an endless source)


@dataclass(frozen=True)
class Report:
    """Frames segmented and the wall time of the frame loop (decode, engine, writing)."""

    frames: int
    seconds: float
    backend: str

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"frames: {self.frames}  seconds: {self.seconds:.2f}  "
                f"frames per second: {self.fps:.1f}  backend: {self.backend}")


def add_io_arguments(parser: argparse.ArgumentParser) -> None:
    """The source, output and pipeline options shared with ``python -m mfnet.predict``."""
    parser.add_argument(
        "--input", required=True, metavar="SRC",
        help="what to segment: a video file, a folder of images (sorted by name), one image "
             "file, or a camera index such as 0")
    parser.add_argument(
        "--output", default=None, metavar="DST", type=options.output_path,
        help=f"where to write: a video file ({', '.join(VIDEO_OUTPUT_EXTENSIONS)}; the overlay, "
             "same size and frame rate as the input) or a folder (per frame, numbered from "
             "000000: NNNNNN.png, the labels as an 8-bit PNG with 0 = background and i = the "
             "i-th class, and NNNNNN_overlay.png); omit it to only measure the speed")
    parser.add_argument("--batch-size", type=options.positive_int, default=1, metavar="B",
                        help="frames per engine call (default 1; larger helps GPUs)")
    parser.add_argument("--max-frames", type=options.positive_int, default=None, metavar="N",
                        help="stop after N frames (cameras run until Ctrl-C otherwise)")
    parser.add_argument("--fps", type=options.number(0, exclusive_minimum=True), default=None,
                        help="frame rate of the output video when the input has none (image "
                             f"folders, images; default {DEFAULT_FPS:g})")
    parser.add_argument("--alpha", type=options.number(0.0, 1.0), default=0.5,
                        help="opacity of the class colours in the overlays (0..1, default 0.5)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar on stderr (plain lines when stderr is not a "
                             "terminal)")
    parser.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=True,
                        help="for frames larger than the network input, upsample the class "
                             "probabilities bilinearly and take the argmax at the frame's size "
                             "(smooth edges); --no-smooth upsamples the labels by nearest "
                             "neighbour (blocky, slightly faster) (default: on)")
    add_threads_argument(parser)


def run_and_report(segmenter: Any, support: Any, args: argparse.Namespace, backend: str,
                   out: TextIO | None = None) -> int:
    """Run ``segment_video`` with the options of ``add_io_arguments``; print the report.

    Returns the exit code (0, or 130 after Ctrl-C, with the report of the frames done).
    """
    out = out or sys.stdout
    if args.batch_size < 1:
        raise RuntimeInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_frames is not None and args.max_frames < 1:
        raise RuntimeInputError(f"--max-frames must be >= 1, got {args.max_frames}")
    if not 0.0 <= args.alpha <= 1.0:
        raise RuntimeInputError(f"--alpha must be in [0, 1], got {args.alpha}")
    source = open_source(args.input)
    total = source.count if args.max_frames is None else min(
        args.max_frames, source.count or args.max_frames)
    results = segment_video(segmenter, source, support, args.output,
                            batch_size=args.batch_size, max_frames=args.max_frames,
                            fps=args.fps, alpha=args.alpha, smooth=args.smooth)
    progress = Progress(total, "segmenting", args.progress)
    start = time.perf_counter()
    code = 0
    try:
        code = _consume(results, progress)
    finally:
        progress.close()
        results.close()
    report = Report(progress.count, time.perf_counter() - start, backend)
    print(f"{source.name}: {report.line()}", file=out)
    if code == 0 and args.max_frames is None and source.count and progress.count < source.count:
        print(f"note: {source.name} announces {source.count} frames but {progress.count} could "
              "be decoded (truncated or corrupt?)", file=out)
    if args.output is not None and progress.count:
        print(f"wrote {args.output}", file=out)
    return code


def _consume(results: Iterable[Any], progress: Progress) -> int:
    try:
        for _ in results:
            progress.update()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mfnet_runtime", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    segment = commands.add_parser(
        "segment", help="segment a video, camera, image folder or image",
        description="Segment every frame of SRC into the support set's classes and write "
                    "label maps and overlays. Prints frames, seconds, frames per second and "
                    "the backend at the end.")
    segment.add_argument("--engines", required=True, metavar="DIR",
                         type=options.directory_path,
                         help="folder of exported engines with their manifest.json "
                              "(export/to_onnx.py, export/to_trt.py)")
    support = segment.add_mutually_exclusive_group(required=True)
    support.add_argument("--support", metavar="SPEC",
                         help="support set: a folder with one sub-folder of images and "
                              "<image>.mask.png masks per class, or a JSON file "
                              "(docs/support_spec.md); as many classes as the engines' way")
    support.add_argument("--load-support", metavar="FILE", type=options.existing_file,
                         help="an encoded support set written earlier with --save-support "
                              "(skips encoding; must come from the same engines)")
    segment.add_argument("--save-support", metavar="FILE", type=options.output_file,
                         help="also save the encoded support set to FILE for --load-support")
    add_io_arguments(segment)
    segment.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"),
                         default="auto",
                         help="inference backend; auto = TensorRT engines if present and "
                              "usable, else ONNX Runtime (default auto)")
    segment.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                         help="auto = CUDA when available, else CPU (default auto)")
    segment.add_argument("--precision", choices=("auto", "fp32", "fp16"), default="auto",
                         help="engine precision; auto = fp16 on CUDA when exported, else fp32 "
                              "(default auto)")
    add_demo_parser(commands)
    return parser


def add_demo_parser(commands: Any) -> None:
    """The ``demo`` command: inputs to try the runtime on (``demo.py``)."""
    from .demo import DEFAULT_CLASSES, LOOKS

    demo = commands.add_parser(
        "demo", help="write a support SPEC, query images and a video to try segment on",
        description="Write DIR/support/ (a support SPEC, docs/support_spec.md), DIR/images/ "
                    "(query images) and DIR/video.mp4 (DIR/video_frames/ without OpenCV), "
                    "drawn with the looks of the synthetic benchmark's novel classes of fold 0, "
                    "which the default checkpoint of python -m mfnet.train never saw in "
                    "training; then print the commands that export that checkpoint and segment "
                    "the video. numpy and Pillow only (OpenCV for the video).")
    demo.add_argument("--out", required=True, metavar="DIR", help="folder to write into")
    demo.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES), choices=list(LOOKS),
                      metavar="NAME",
                      help=f"the classes, as many as the model's way ({', '.join(LOOKS)}; "
                           f"default: {' '.join(DEFAULT_CLASSES)})")
    demo.add_argument("--frames", type=int, default=48, help="video frames (default 48)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def demo_command(args: argparse.Namespace) -> int:
    """The ``demo`` command: write the files, print where they are and what to run next."""
    from .demo import next_commands, write_demo

    if args.frames < 1:
        raise RuntimeInputError(f"--frames must be >= 1, got {args.frames}")
    files = write_demo(args.out, tuple(args.classes), frames=args.frames, seed=args.seed)
    print(f"support SPEC: {files.support} ({', '.join(files.classes)}, one shot each)")
    print(f"query images: {files.images}")
    if files.video_is_folder:
        print(f"video frames: {files.video} (OpenCV is not installed, so no video file was "
              "written; pip install 'mfnet-runtime[video]' for one)")
    else:
        print(f"video: {files.video}")
    print("next:")
    for command in next_commands(files):
        print(f"  {command}")
    return 0


def segment_command(args: argparse.Namespace) -> int:
    """The ``segment`` command; raises ``RuntimeInputError`` / ``EngineError`` on bad inputs."""
    from .segmenter import Segmenter
    from .support import SupportSet

    policy = thread_policy(args.threads)
    print(policy.describe())
    segmenter = Segmenter.load(args.engines, backend=args.backend, device=args.device,
                               precision=args.precision, threads=policy.threads)
    started = time.perf_counter()
    if args.load_support is not None:
        support = SupportSet.load(args.load_support, segmenter=segmenter)
        how = f"loaded from {args.load_support}"
    else:
        support = segmenter.encode_support(load_support_spec(args.support), color="rgb")
        how = f"encoded from {args.support}"
    print(f"support: {len(support.class_names)} classes ({', '.join(support.class_names)}) "
          f"{how} in {time.perf_counter() - started:.2f} s")
    if args.save_support is not None:
        support.save(args.save_support)
        print(f"saved the support set to {args.save_support}")
    return run_and_report(segmenter, support, args,
                          f"{segmenter.backend_name} ({segmenter.precision})")


@command_boundary(*RUNTIME_ERRORS)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return demo_command(args) if args.command == "demo" else segment_command(args)
