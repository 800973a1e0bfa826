"""Progress of the library's long loops (training epochs, evaluation runs, data indexing) on stderr.

On a terminal, tqdm's bar. Elsewhere (a log file, a pipe) a bar's carriage-return redraws run
together into one unreadable line, so the loop writes whole, newline-terminated lines instead:
one at each tenth of its length and one at the end, like the runtime's ``Progress``, which also
writes whole lines when stderr is not a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm


class ProgressLines:
    """tqdm's ``__iter__`` / ``set_postfix`` / ``close`` as plain lines, e.g.
    ``epoch 1/3: 6/12 (50%), loss=0.2881, lr=1.90e-02``; writes nothing when not ``enabled``."""

    def __init__(
        self,
        iterable: Iterable,
        total: int,
        description: str,
        initial: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.iterable, self.total, self.description = iterable, total, description
        self.enabled, self.stream = enabled, stream or sys.stderr
        self.count = self._written = initial
        self._tenth = self._tenths(initial)
        self._postfix = ""

    def _tenths(self, count: int) -> int:
        """How many tenths of the total ``count`` items are."""
        return count * 10 // self.total if self.total else 0

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.count += 1  # after the loop's body, as tqdm counts
            tenth = self._tenths(self.count)
            if tenth > self._tenth or self.count == self.total:
                self._tenth = tenth
                self._write()

    def set_postfix(self, values: dict[str, Any]) -> None:
        """Values shown after the count from the next line on."""
        self._postfix = ", ".join(f"{name}={value}" for name, value in values.items())

    def _write(self) -> None:
        """One line: description, count of total, share, the postfix values."""
        if not self.enabled:
            return
        share = f" ({100 * self.count // self.total}%)" if self.total else ""
        postfix = f", {self._postfix}" if self._postfix else ""
        self.stream.write(f"{self.description}: {self.count}/{self.total}{share}{postfix}\n")
        self.stream.flush()
        self._written = self.count

    def close(self) -> None:
        """Write the count a loop stopped at early (a break, an exception) if not yet shown."""
        if self.count != self._written:
            self._write()


def progress_bar(
    iterable: Iterable,
    description: str,
    *,
    total: int | None = None,
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
    leave: bool = True,
    stream: TextIO | None = None,
) -> tqdm | ProgressLines:
    """``iterable`` wrapped to show its progress on ``stream`` (default stderr): a tqdm bar on a
    terminal, ``ProgressLines`` elsewhere. ``total`` defaults to ``len(iterable)``; ``initial``
    items were done before (a resumed epoch); ``unit`` and ``leave`` apply to the bar."""
    stream = stream or sys.stderr
    total = len(iterable) if total is None else total  # type: ignore[arg-type]
    isatty = getattr(stream, "isatty", None)
    if enabled and isatty is not None and isatty():
        return tqdm(
            iterable,
            desc=description,
            total=total,
            initial=initial,
            unit=unit,
            leave=leave,
            file=stream,
            dynamic_ncols=True,
        )
    return ProgressLines(
        iterable, total, description, initial=initial, enabled=enabled, stream=stream
    )
