"""The query side of the runtime's API, once for every segmenter: frames in, label maps out.

``Segmenter`` (engines in this process) and ``serving.RemoteSegmenter`` (engines on a server)
differ only in how a batch of prepared frames is decoded (``_decode``); fitting frames to the
network input, restoring label maps and probabilities to each frame's own size, and the
``segment`` / ``segment_batch`` / ``probabilities`` calls built on them live here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import RuntimeInputError
from .images import (
    Geometry,
    ImageInput,
    check_color,
    prepare_frames,
    restore_labels,
    restore_probabilities,
    restore_smooth,
)
from .support import SupportSet


class FrameAPI:
    """Base of the segmenters: needs ``input_size`` (S), ``resize`` ("pad" | "stretch") and
    ``_decode(batch, support, with_probabilities)``."""

    input_size: int
    resize: str

    def _decode(
        self, batch: np.ndarray, support: SupportSet, with_probabilities: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Prepared frames uint8 [B, S, S, 3] -> (labels uint8 [B, S, S], probabilities
        float32 [B, N+1, S, S] or None)."""
        raise NotImplementedError

    def prepare_frames(
        self, frames: Sequence[ImageInput] | np.ndarray, color: str = "rgb"
    ) -> tuple[np.ndarray, list[Geometry]]:
        """Frames -> (uint8 [B, S, S, 3] RGB network input, per-frame geometry).

        Geometry is (orig_h, orig_w, content_h, content_w). Safe to call from another thread
        (e.g. a video decode thread): it only uses numpy and PIL.
        """
        check_color(color)
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            frames = list(frames)
        if isinstance(frames, (np.ndarray, str, Path)):
            raise RuntimeInputError(
                "prepare_frames takes a list of frames; wrap a single frame in a list"
            )
        return prepare_frames(frames, self.input_size, self.resize, color)

    def decode_prepared(self, batch: np.ndarray, support: SupportSet) -> np.ndarray:
        """uint8 [B, S, S, 3] prepared frames -> labels uint8 [B, S, S] (0 = background,
        n = ``support.class_names[n - 1]``); batches larger than ``max_batch`` are split."""
        return self._decode(batch, support, False)[0]

    def decode_with_probabilities(
        self, batch: np.ndarray, support: SupportSet
    ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B, S, S, 3] prepared frames -> (labels uint8 [B, S, S], probabilities
        float32 [B, N+1, S, S]), for ``restore_smooth``."""
        labels, probabilities = self._decode(batch, support, True)
        assert probabilities is not None  # asked for
        return labels, probabilities

    def restore_smooth(self, probabilities_s: np.ndarray, geometry: Geometry) -> np.ndarray:
        """float32 [N+1, S, S] -> uint8 [orig_h, orig_w] labels: bilinear upsampling of the
        probabilities, then the argmax (smooth edges on frames larger than S)."""
        return restore_smooth(probabilities_s, geometry)

    def restore_labels(self, labels_s: np.ndarray, geometry: Geometry) -> np.ndarray:
        """uint8 [S, S] labels -> uint8 [orig_h, orig_w] (crop the content, nearest resize)."""
        size = self.input_size
        if not isinstance(labels_s, np.ndarray) or labels_s.shape != (size, size):
            got = labels_s.shape if isinstance(labels_s, np.ndarray) else type(labels_s)
            raise RuntimeInputError(f"labels must be [{size}, {size}], got {got}")
        return restore_labels(labels_s, geometry)

    def segment(self, frame: ImageInput, support: SupportSet, color: str = "rgb") -> np.ndarray:
        """One frame (uint8 [H, W, 3] RGB, or BGR with ``color="bgr"``, or a file path) ->
        labels uint8 [H, W] at the frame's own size."""
        batch, geometry = self.prepare_frames([frame], color)
        return self.restore_labels(self.decode_prepared(batch, support)[0], geometry[0])

    def segment_batch(
        self, frames: Sequence[ImageInput], support: SupportSet, color: str = "rgb"
    ) -> list[np.ndarray]:
        """Several frames (any sizes) -> one uint8 [H_i, W_i] label map each; the decoder runs
        on batches of up to ``max_batch`` frames."""
        batch, geometry = self.prepare_frames(frames, color)
        labels = self.decode_prepared(batch, support)
        return [
            self.restore_labels(one, shape) for one, shape in zip(labels, geometry, strict=False)
        ]

    def probabilities(
        self, frame: ImageInput, support: SupportSet, color: str = "rgb"
    ) -> np.ndarray:
        """One frame -> float32 [N+1, H, W] softmax (channel 0 = background) at its size."""
        batch, geometry = self.prepare_frames([frame], color)
        _, probabilities = self._decode(batch, support, True)
        assert probabilities is not None  # one frame: never an empty batch
        return restore_probabilities(probabilities[0], geometry[0])
