"""Progress and the closing report of a frame loop, on the console.

``Progress`` counts frames on stderr: on a terminal tqdm's bar when tqdm is installed, else a
plain line rewritten in place; elsewhere (a log file, a pipe) whole lines, rate-limited.
``Report`` is the one line both segment commands print at the end.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO


class Progress:
    """A frame counter on stderr. On a terminal: tqdm's bar when tqdm is installed, else a
    plain line rewritten at most twice a second. Elsewhere (a log file, a pipe): one complete,
    newline-terminated line per update, at most one a second, and the last one. ``total`` is
    None for endless sources (cameras)."""

    def __init__(
        self,
        total: int | None,
        description: str,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.description, self.enabled = total, description, enabled
        self.stream = stream or sys.stderr
        self.count, self._last_draw, self._drawn = 0, 0.0, 0
        self._bar: Any = None
        isatty = getattr(self.stream, "isatty", None)
        self._terminal = bool(isatty and isatty())
        self._interval = 0.5 if self._terminal else 1.0
        if enabled and self._terminal:
            try:  # tqdm is optional: imported only for a bar on a terminal
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(
                    total=total,
                    desc=description,
                    unit="frame",
                    file=self.stream,
                    dynamic_ncols=True,
                )

    def update(self, frames: int = 1) -> None:
        """Count ``frames`` more; redraw when the rate limit allows (or at the total)."""
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
        """Write the current count (rewritten in place on a terminal, a new line elsewhere)."""
        of = f"/{self.total}" if self.total else ""
        line = f"{self.description}: {self.count}{of} frames"
        self.stream.write(f"\r{line}" if self._terminal else f"{line}\n")
        self.stream.flush()
        self._drawn = self.count

    def close(self) -> None:
        """Finish the bar or line; elsewhere, write the final count if not yet written."""
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
        """Frames per second (0 for no time)."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The report as one line: frames, seconds, frames per second, backend."""
        return (
            f"frames: {self.frames}  seconds: {self.seconds:.2f}  "
            f"frames per second: {self.fps:.1f}  backend: {self.backend}"
        )
