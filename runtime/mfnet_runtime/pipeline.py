"""The frame pipeline shared by ``python -m mfnet_runtime segment`` and ``python -m mfnet.predict``.

Frames are read and fitted to the network input (``images.prepare_frames``) in a background
thread that feeds a bounded queue, so the accelerator is not kept waiting on the decoder and
memory stays flat however long the video: at most ``queue_size`` prepared batches are in flight.
The segmenter decodes each batch; the labels are mapped back to each frame's own size here
(``images.restore_labels``, or ``restore_smooth`` from the probabilities), written and counted.

A segmenter is anything with the ``FrameSegmenter`` protocol: the runtime's ``Segmenter``
(exported engines) and ``mfnet.predict``'s ``TorchSegmenter`` (a PyTorch checkpoint). Both
commands take the options of ``add_io_arguments`` and end with ``run_and_report``.
"""

from __future__ import annotations

import argparse
import itertools
import queue
import sys
import threading
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np

from . import options
from .boundary import EXIT_INTERRUPTED
from .errors import RuntimeInputError
from .images import Geometry, prepare_frames, restore_labels, restore_smooth
from .progress import Progress, Report
from .threads import add_threads_argument
from .video import (
    DEFAULT_FPS,
    VIDEO_OUTPUT_EXTENSIONS,
    FrameResult,
    FrameSource,
    Writer,
    open_source,
    open_writer,
)


class Support(Protocol):
    """A support set as the pipeline sees it: label n + 1 is ``class_names[n]`` (the legend)."""

    @property
    def class_names(self) -> tuple[str, ...]:
        """One name per class, in label order."""
        ...


class FrameSegmenter(Protocol):
    """What the pipeline needs from a segmenter: the S x S input frames are fitted to and the
    decoder on prepared frames. Fitting and mapping back are the pipeline's, so every
    segmenter fits frames alike. ``support`` is the segmenter's own kind of support set."""

    input_size: int  # S
    resize: str  # "pad" | "stretch", as ``images.fit``

    def decode_prepared(self, batch: np.ndarray, support: Any) -> np.ndarray:
        """uint8 [B, S, S, 3] RGB -> labels uint8 [B, S, S] (0 = background)."""
        ...

    def decode_with_probabilities(
        self, batch: np.ndarray, support: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B, S, S, 3] RGB -> (labels uint8 [B, S, S], softmax probabilities float32
        [B, N+1, S, S])."""
        ...


@dataclass(frozen=True)
class _Batch:
    """Frames start..start+B-1: as read, fitted (uint8 [B, S, S, 3]), and their geometry."""

    start: int
    frames: list[np.ndarray]
    prepared: np.ndarray
    geometry: list[Geometry]


@dataclass(frozen=True)
class _Failure:
    """An exception of the decode thread, re-raised by the consumer."""

    error: BaseException


_END = object()


def _put(items: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put unless asked to stop; False when stopped (the consumer has gone)."""
    while not stop.is_set():
        try:
            items.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _produce(
    source: FrameSource,
    size: int,
    mode: str,
    batch_size: int,
    max_frames: int | None,
    items: queue.Queue,
    stop: threading.Event,
) -> None:
    """Decode thread: read frames, prepare them batch by batch, feed the queue; owns ``source``."""
    try:
        start, batch = 0, []
        for frame in itertools.islice(source.frames(), max_frames):
            if stop.is_set():
                break
            batch.append(frame)
            if len(batch) == batch_size:
                prepared, geometry = prepare_frames(batch, size, mode, color="rgb")
                if not _put(items, _Batch(start, batch, prepared, geometry), stop):
                    return
                start, batch = start + len(batch), []
        if batch and not stop.is_set():
            prepared, geometry = prepare_frames(batch, size, mode, color="rgb")
            if not _put(items, _Batch(start, batch, prepared, geometry), stop):
                return
        _put(items, _END, stop)
    except BaseException as error:  # noqa: BLE001 - handed to the consumer, re-raised there
        _put(items, _Failure(error), stop)
    finally:
        source.close()


def segment_video(
    segmenter: FrameSegmenter,
    source: Any,
    support: Support,
    output: str | Path | None = None,
    *,
    batch_size: int = 1,
    color: str = "rgb",
    max_frames: int | None = None,
    fps: float | None = None,
    alpha: float = 0.5,
    queue_size: int = 4,
    smooth: bool = False,
) -> Generator[FrameResult, None, None]:
    """Segment every frame of ``source`` with ``support``; yield ``FrameResult`` s in order.

    Args:
        segmenter: a ``FrameSegmenter`` (``Segmenter``, or ``mfnet.predict``'s PyTorch twin).
        source: see ``video.open_source``: video path, image folder, image path, camera index,
            iterable of uint8 [H, W, 3] arrays (in ``color`` order), or a ``FrameSource``.
        support: the encoded support set (its ``class_names`` label the legend).
        output: None; a .mp4/.avi path (overlay video, the source's fps, else ``fps``, else 25);
            or a folder (``<index>.png`` labels and ``<index>_overlay.png`` overlays).
        batch_size: frames per ``decode_prepared`` call.
        max_frames: stop after this many frames (cameras never end on their own).
        alpha: overlay colour weight.
        queue_size: prepared batches buffered between the decode thread and the engine.
        smooth: for frames larger than the network input, upsample the class probabilities
            bilinearly to the frame and take the argmax there (``restore_smooth``), instead
            of a nearest-neighbour upsampling of the labels, which looks blocky.

    The source and the output are opened before this returns, so bad inputs raise
    ``RuntimeInputError`` here; errors while decoding are re-raised from the iteration.
    Stopping the iteration early (``break``, ``close()``) stops the decode thread.
    """
    if batch_size < 1 or queue_size < 1:
        raise RuntimeInputError(
            f"batch_size and queue_size must be >= 1, got {batch_size}, {queue_size}"
        )
    frames = open_source(source, color)
    try:
        count = frames.count if max_frames is None else min(max_frames, frames.count or max_frames)
        writer = open_writer(output, tuple(support.class_names), frames.fps or fps, alpha, count)
    except BaseException:
        frames.close()
        raise
    return _run(segmenter, frames, support, writer, batch_size, max_frames, queue_size, smooth)


def _enlarged(geometry: Geometry) -> bool:
    """Whether a frame is larger than its content in the network input (orig > content)."""
    return geometry.orig_h > geometry.content_h or geometry.orig_w > geometry.content_w


def _decode_batch(
    segmenter: FrameSegmenter, item: _Batch, support: Support, smooth: bool
) -> list[np.ndarray]:
    """Labels of one prepared batch at each frame's own size (uint8 [H_i, W_i] each)."""
    if smooth and any(_enlarged(g) for g in item.geometry):
        # labels [B, S, S], probabilities [B, N+1, S, S]
        labels, probabilities = segmenter.decode_with_probabilities(item.prepared, support)
        return [
            restore_smooth(probabilities[i], item.geometry[i])
            if _enlarged(item.geometry[i])
            else restore_labels(labels[i], item.geometry[i])
            for i in range(len(item.frames))
        ]
    labels = segmenter.decode_prepared(item.prepared, support)  # [B, S, S]
    return [restore_labels(labels[i], item.geometry[i]) for i in range(len(item.frames))]


def _run(
    segmenter: FrameSegmenter,
    source: FrameSource,
    support: Support,
    writer: Writer | None,
    batch_size: int,
    max_frames: int | None,
    queue_size: int,
    smooth: bool,
) -> Generator[FrameResult, None, None]:
    """The consumer: decode, restore, write and yield each batch the decode thread queued."""
    items: queue.Queue = queue.Queue(maxsize=queue_size)
    stop = threading.Event()
    thread = threading.Thread(
        target=_produce,
        name="mfnet-decode",
        daemon=True,
        args=(source, segmenter.input_size, segmenter.resize, batch_size, max_frames, items, stop),
    )
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            restored = _decode_batch(segmenter, item, support, smooth)
            for offset, frame in enumerate(item.frames):
                index = item.start + offset
                result = FrameResult(index, frame, restored[offset], source.frame_name(index))
                if writer is not None:
                    writer.write(result)
                yield result
    finally:
        stop.set()
        while not items.empty():  # free buffered batches now, not when the generator dies
            try:
                items.get_nowait()
            except queue.Empty:
                break
        thread.join(timeout=10.0)
        if writer is not None:
            writer.close()


# ------------------------------------------------------------------------- the commands' face
def add_io_arguments(parser: argparse.ArgumentParser) -> None:
    """The source, output and pipeline options of both segment commands."""
    parser.add_argument(
        "--input",
        required=True,
        metavar="SRC",
        help="what to segment: a video file, a folder of images (sorted by name), one image "
        "file, or a camera index such as 0",
    )
    parser.add_argument(
        "--output",
        default=None,
        metavar="DST",
        type=options.output_path,
        help=f"where to write: a video file ({', '.join(VIDEO_OUTPUT_EXTENSIONS)}; the overlay, "
        "same size and frame rate as the input) or a folder (per frame, numbered from "
        "000000: NNNNNN.png, the labels as an 8-bit PNG with 0 = background and i = the "
        "i-th class, and NNNNNN_overlay.png); omit it to only measure the speed",
    )
    parser.add_argument(
        "--batch-size",
        type=options.positive_int,
        default=1,
        metavar="B",
        help="frames per engine call (default 1; larger helps GPUs)",
    )
    parser.add_argument(
        "--max-frames",
        type=options.positive_int,
        default=None,
        metavar="N",
        help="stop after N frames (cameras run until Ctrl-C otherwise)",
    )
    parser.add_argument(
        "--fps",
        type=options.number(0, exclusive_minimum=True),
        default=None,
        help="frame rate of the output video when the input has none (image "
        f"folders, images; default {DEFAULT_FPS:g})",
    )
    parser.add_argument(
        "--alpha",
        type=options.number(0.0, 1.0),
        default=0.5,
        help="opacity of the class colours in the overlays (0..1, default 0.5)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar on stderr (plain lines when stderr is not a terminal)",
    )
    parser.add_argument(
        "--smooth",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="for frames larger than the network input, upsample the class "
        "probabilities bilinearly and take the argmax at the frame's size "
        "(smooth edges); --no-smooth upsamples the labels by nearest "
        "neighbour (blocky, slightly faster) (default: on)",
    )
    add_threads_argument(parser)


def run_and_report(
    segmenter: FrameSegmenter,
    support: Support,
    args: argparse.Namespace,
    backend: str,
    out: TextIO | None = None,
) -> int:
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
    total = (
        source.count
        if args.max_frames is None
        else min(args.max_frames, source.count or args.max_frames)
    )
    results = segment_video(
        segmenter,
        source,
        support,
        args.output,
        batch_size=args.batch_size,
        max_frames=args.max_frames,
        fps=args.fps,
        alpha=args.alpha,
        smooth=args.smooth,
    )
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
        print(
            f"note: {source.name} announces {source.count} frames but {progress.count} could "
            "be decoded (truncated or corrupt?)",
            file=out,
        )
    if args.output is not None and progress.count:
        print(f"wrote {args.output}", file=out)
    return code


def _consume(results: Iterable[FrameResult], progress: Progress) -> int:
    """Count every result; 130 (``EXIT_INTERRUPTED``) after Ctrl-C, else 0."""
    try:
        for _ in results:
            progress.update()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0
