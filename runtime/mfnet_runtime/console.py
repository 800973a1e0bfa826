"""Console logging for the project's commands (the runtime's and mfnet's).

Library modules log through a module logger (``logging.getLogger(__name__)``) and never print;
a command calls :func:`configure_logging` once, so that INFO messages from the library appear on
stdout as plain lines (what the commands showed before they logged) and warnings and errors on
stderr with a ``warning:`` / ``error:`` prefix. Calling it again replaces the handlers it added.
"""

from __future__ import annotations

import logging
import sys

_MARK = "_mfnet_console"  # set on the handlers added here, so a second call replaces them


class _ConsoleHandler(logging.StreamHandler):
    """Records below WARNING to the current ``sys.stdout``, the rest to the current ``sys.stderr``.

    The streams are looked up per record, not bound once, so redirected or captured streams
    (``contextlib.redirect_stdout``, test capture) receive the lines.
    """

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        super().emit(record)


class _LevelPrefix(logging.Formatter):
    """``message`` for INFO and below, ``warning: message`` / ``error: message`` above."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def configure_logging(verbose: bool = False) -> None:
    """Show the project's log records on the console: INFO (DEBUG if ``verbose``) and above.

    Only the ``mfnet`` and ``mfnet_runtime`` loggers are configured; other libraries keep their
    own defaults (Python's last-resort handler prints their warnings to stderr).
    """
    level = logging.DEBUG if verbose else logging.INFO
    handler = _ConsoleHandler()
    handler.setFormatter(_LevelPrefix("%(message)s"))
    setattr(handler, _MARK, True)
    for name in ("mfnet", "mfnet_runtime"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, _MARK, False)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # one line per record, not one more from the root logger
