"""Frame sources (video file, image folder, image, camera, arrays) and the writers of
segmented frames (overlay video, or label and overlay PNGs); ``pipeline`` runs between them.

OpenCV is needed only for video files, cameras and video output (``pip install
'mfnet-runtime[video]'``); image folders and PNG output work without it. Every frame leaving
this module is uint8 [H, W, 3] RGB.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .atomic import atomic_write_bytes
from .errors import RuntimeInputError, require
from .images import read_image_file
from .overlay import overlay
from .spec import IMAGE_EXTENSIONS, is_image_file

VIDEO_OUTPUT_EXTENSIONS = (".mp4", ".avi")
# Containers refused as output (rather than becoming a folder named "out.mkv")
OTHER_VIDEO_EXTENSIONS = (".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
IMAGE_OUTPUT_EXTENSION = ".png"  # labels of a single image (lossless)
DEFAULT_FPS = 25.0  # output video rate when the source has none (image folders, arrays)
INSTALL_HINT = "pip install 'mfnet-runtime[video]'"


def require_cv2() -> Any:
    """Import OpenCV, or raise ``MissingDependencyError`` saying how to install it."""
    return require("cv2", "video files, cameras and video output (OpenCV)", INSTALL_HINT)


@dataclass(frozen=True)
class FrameResult:
    """One segmented frame: ``frame`` uint8 [H, W, 3] RGB, ``labels`` uint8 [H, W]
    (0 = background, i = the i-th support class), ``index`` counting from 0."""

    index: int
    frame: np.ndarray
    labels: np.ndarray
    name: str | None = None  # the input file's name without extension (image inputs)


class FrameSource:
    """Frames in order. ``frames()`` yields uint8 [H, W, 3] RGB; ``fps`` and ``count`` are None
    when unknown (cameras, arrays). Iterate once; ``close()`` releases the device or file."""

    name: str = "frames"
    fps: float | None = None
    count: int | None = None

    def frames(self) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def frame_name(self, index: int) -> str | None:
        """The name outputs of frame ``index`` are written under (None: numbered)."""
        return None

    def close(self) -> None:
        """Release what the source holds (idempotent)."""


class ImageFilesSource(FrameSource):
    """Image files (read with PIL, EXIF orientation applied), in the given order."""

    def __init__(self, paths: list[Path], name: str) -> None:
        self.paths, self.name, self.count = list(paths), name, len(paths)
        stems = [path.stem for path in self.paths]
        # a.jpg and a.png in one folder would both become a.png: keep their extensions apart
        self._names = [
            stem if stems.count(stem) == 1 else f"{stem}_{path.suffix[1:]}"
            for stem, path in zip(stems, self.paths, strict=True)
        ]

    def frames(self) -> Iterator[np.ndarray]:
        for path in self.paths:
            yield read_image_file(path)

    def frame_name(self, index: int) -> str | None:
        return self._names[index]


class CaptureSource(FrameSource):
    """An OpenCV ``VideoCapture`` (a video file or a camera). The first frame is read on
    opening so that an unreadable file or camera fails at once, with its name."""

    def __init__(self, target: str | int, name: str) -> None:
        cv2 = require_cv2()
        self._cv2, self.name = cv2, name
        self._capture = cv2.VideoCapture(target)
        if not self._capture.isOpened():
            self._capture.release()
            why = (
                "no such device, no permission, or in use by another program"
                if isinstance(target, int)
                else "corrupt, or a format OpenCV cannot decode"
            )
            raise RuntimeInputError(f"{name} could not be opened ({why})")
        ok, first = self._capture.read()
        if not ok or first is None:
            self._capture.release()
            raise RuntimeInputError(f"{name} delivered no frame (corrupt, empty or busy)")
        self._first: np.ndarray | None = first
        fps = float(self._capture.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if np.isfinite(fps) and 0.0 < fps < 1000.0 else None
        if isinstance(target, str):
            count = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
            self.count = count if count > 0 else None

    def frames(self) -> Iterator[np.ndarray]:
        cv2 = self._cv2
        frame, self._first = self._first, None
        while frame is not None:
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            ok, frame = self._capture.read()
            if not ok:
                return

    def close(self) -> None:
        self._capture.release()


class ArraySource(FrameSource):
    """Any iterable of uint8 [H, W, 3] arrays; ``color`` is their channel order ("rgb"/"bgr")."""

    def __init__(
        self, frames: Iterable[np.ndarray], color: str = "rgb", name: str = "frames"
    ) -> None:
        if color not in ("rgb", "bgr"):
            raise RuntimeInputError(f"color must be 'rgb' or 'bgr', got {color!r}")
        self._frames, self._color, self.name = frames, color, name
        self.count = len(frames) if isinstance(frames, (list, tuple)) else None

    def frames(self) -> Iterator[np.ndarray]:
        for frame in self._frames:
            yield np.ascontiguousarray(frame[..., ::-1]) if self._color == "bgr" else frame


def open_source(source: Any, color: str = "rgb") -> FrameSource:
    """Open what ``source`` names: a ``FrameSource``; an int (or a string of digits that is not
    an existing path) = camera index; an image folder (sorted by file name); an image file; a
    video file; or an iterable of arrays in ``color`` order. Raises ``RuntimeInputError``."""
    if isinstance(source, FrameSource):
        return source
    if isinstance(source, str) and source.isdigit() and not Path(source).exists():
        source = int(source)
    if isinstance(source, (int, np.integer)) and not isinstance(source, bool):
        return CaptureSource(int(source), f"camera {int(source)}")
    if not isinstance(source, (str, Path)):
        return ArraySource(source, color)
    path = Path(source)
    if not path.exists():
        raise RuntimeInputError(f"input {path} does not exist")
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if is_image_file(p))
        if not images:
            raise RuntimeInputError(
                f"input folder {path} holds no image ({', '.join(IMAGE_EXTENSIONS)})"
            )
        return ImageFilesSource(images, f"folder {path}")
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return ImageFilesSource([path], f"image {path}")
    return CaptureSource(str(path), f"video {path}")


def _write_pngs(
    labels_path: Path, result: FrameResult, class_names: tuple[str, ...], alpha: float
) -> Path:
    """``labels_path`` (mode L, label values 0..N) and ``<stem>_overlay.png`` (RGB) beside it."""
    # uint8 [H, W] is saved as an 8-bit greyscale (mode L) PNG holding the label values
    _save_png(np.asarray(result.labels, np.uint8), labels_path)
    drawn = overlay(result.frame, result.labels, class_names, alpha)
    overlay_path = labels_path.with_name(labels_path.stem + "_overlay.png")
    _save_png(drawn, overlay_path)
    return overlay_path


class FolderWriter:
    """Per frame, ``<name>.png`` (mode L, label values 0..N) and ``<name>_overlay.png`` (RGB):
    ``<name>`` is the input image's file name without its extension, or for video and camera
    frames the index zero-padded to 6 digits, so that file order is frame order."""

    def __init__(self, folder: Path, class_names: tuple[str, ...], alpha: float) -> None:
        if folder.exists() and not folder.is_dir():
            raise RuntimeInputError(f"output {folder} exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.class_names, self.alpha = folder, class_names, alpha

    def write(self, result: FrameResult) -> None:
        name = result.name if result.name is not None else f"{result.index:06d}"
        _write_pngs(self.folder / f"{name}.png", result, self.class_names, self.alpha)

    def close(self) -> None:
        """Nothing is held open between frames."""


def _save_png(array: np.ndarray, path: Path) -> None:
    """Encode in memory, then replace ``path`` atomically: a full disk never leaves a
    truncated frame (or destroys the one an earlier run wrote there)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


class ImageWriter:
    """One image's labels to ``path`` (a .png, mode L) and its overlay to ``<stem>_overlay.png``
    beside it."""

    def __init__(self, path: Path, class_names: tuple[str, ...], alpha: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.class_names, self.alpha = path, class_names, alpha

    def write(self, result: FrameResult) -> None:
        _write_pngs(self.path, result, self.class_names, self.alpha)

    def close(self) -> None:
        """Nothing is held open."""


class VideoWriter:
    """Writes overlays to a video (mp4v fourcc) at the size of the first frame; later frames of
    another size (image folders) are resized to it."""

    def __init__(self, path: Path, class_names: tuple[str, ...], alpha: float, fps: float) -> None:
        self._cv2 = require_cv2()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.class_names, self.alpha, self.fps = path, class_names, alpha, fps
        self._writer: Any = None
        self._size: tuple[int, int] | None = None

    def write(self, result: FrameResult) -> None:
        cv2 = self._cv2
        drawn = overlay(result.frame, result.labels, self.class_names, self.alpha)
        height, width = drawn.shape[:2]
        if self._writer is None:
            self._size = (width, height)
            self._writer = cv2.VideoWriter(
                str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self._size
            )
            if not self._writer.isOpened():
                raise RuntimeInputError(
                    f"cannot write video {self.path} (mp4v codec, "
                    f"{width}x{height} at {self.fps:g} fps)"
                )
        if (width, height) != self._size:
            drawn = cv2.resize(drawn, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


Writer = FolderWriter | ImageWriter | VideoWriter


def open_writer(
    output: str | Path | None,
    class_names: tuple[str, ...],
    fps: float | None,
    alpha: float = 0.5,
    frames: int | None = None,
) -> Writer | None:
    """The writer ``output`` names (None: no output): a .mp4/.avi path -> overlay video; a .png
    path -> labels + overlay of a single image (``frames`` must be 1); an existing folder or a
    path without an extension -> a folder of PNGs. Any other extension is an error, so that a
    typo never becomes a folder named ``out.gif``."""
    if output is None:
        return None
    path = Path(output)
    suffix = path.suffix.lower()
    if suffix in VIDEO_OUTPUT_EXTENSIONS:
        return VideoWriter(path, class_names, alpha, fps or DEFAULT_FPS)
    if suffix in OTHER_VIDEO_EXTENSIONS:
        raise RuntimeInputError(
            f"output {path}: videos are written as "
            f"{' or '.join(VIDEO_OUTPUT_EXTENSIONS)} (mp4v codec)"
        )
    if suffix == IMAGE_OUTPUT_EXTENSION and not path.is_dir():
        if frames != 1:
            many = "an unknown number of" if frames is None else str(frames)
            raise RuntimeInputError(
                f"output {path} is an image file but the input has {many} frames; give a "
                f"folder (one label and overlay PNG per frame) or a video "
                f"({', '.join(VIDEO_OUTPUT_EXTENSIONS)})"
            )
        return ImageWriter(path, class_names, alpha)
    if suffix and not path.is_dir():
        lossy = (
            " (label maps are written losslessly, as .png)" if suffix in IMAGE_EXTENSIONS else ""
        )
        raise RuntimeInputError(
            f"output {path}: unknown output extension {suffix!r}{lossy}; give a folder (a path "
            f"without an extension), a video ({', '.join(VIDEO_OUTPUT_EXTENSIONS)}) or, for a "
            f"single input image, a {IMAGE_OUTPUT_EXTENSION} file"
        )
    return FolderWriter(path, class_names, alpha)
