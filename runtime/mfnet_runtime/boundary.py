"""The error boundary of a command line: expected errors become one ``error: ...`` line.

Every command (``python -m mfnet_runtime``, and the training package's ``train``, ``evaluate``,
``predict`` and export commands, which reuse this module) wraps its ``main`` with
``command_boundary(*expected)``: an exception of an ``expected`` type (the project's typed
errors, and ``OSError`` for files that cannot be read or written) prints ``error: <message>``
on one line of stderr and returns exit code 2; Ctrl-C returns 130; anything else is a bug and
keeps its traceback. Messages are flattened to one line and never carry the advice to load a
file with ``weights_only=False`` (the switch that lets a malicious checkpoint run code).

Standard library only: the runtime never imports torch or the training package.
"""

from __future__ import annotations

import errno
import functools
import re
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130

Main = TypeVar("Main", bound=Callable[..., int])

# torch.load's refusal text runs from "Weights only load failed" to the documentation link; the
# only part worth showing is what it found ("Unsupported global: GLOBAL os.system ...").
_TORCH_REFUSAL = re.compile(r"Weights only load failed.*?(?:torch\.load\.html\.?|$)", re.S)
_REFUSAL_DETAILS = (  # what torch's variants of the text say was found
    (re.compile(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)"), "unsupported global {}"),
    (re.compile(r"Unsupported operand (\d+)"), "unsupported pickle opcode {}"),
)
# A sentence that mentions one of these is advice to weaken the safe loader: dropped.
_UNSAFE_ADVICE = re.compile(r"weights_only|safe_globals|allowlist|allowed global", re.I)
_SENTENCE_END = re.compile(r"(?<=[.;])\s+")

_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or choose another location",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose another location",
    errno.EACCES: "permission denied: check the permissions or choose another location",
    errno.EPERM: "operation not permitted: check the permissions or choose another location",
    errno.EROFS: "the file system is read-only: choose another location",
}


def scrub_unsafe_advice(text: str) -> str:
    """``text`` without torch's advice to re-run ``torch.load`` with ``weights_only=False``.

    torch's refusal is replaced by what it found (the unsupported global or opcode), stated as
    a refusal; any other sentence that suggests weakening the safe loader is dropped.
    """

    def refusal(match: re.Match[str]) -> str:
        found = [
            template.format(hit.group(1))
            for pattern, template in _REFUSAL_DETAILS
            for hit in [pattern.search(match.group(0))]
            if hit
        ]
        return (
            "the file holds data other than tensors and plain values, which is never "
            "unpickled" + (f" ({found[0]})" if found else "")
        )

    text = _TORCH_REFUSAL.sub(refusal, text)
    if not _UNSAFE_ADVICE.search(text):
        return text
    kept = [s for s in _SENTENCE_END.split(text) if not _UNSAFE_ADVICE.search(s)]
    return " ".join(kept) or "the file was refused by the safe loader"


def os_error_message(error: OSError) -> str:
    """An ``OSError`` as one sentence: the file, the system's reason, and what to do."""
    reason = error.strerror or str(error)
    where = f"{error.filename}: " if error.filename else ""
    hint = _OS_HINTS.get(error.errno or -1)
    return f"{where}{reason}" + (f" ({hint})" if hint else "")


def error_line(error: BaseException) -> str:
    """``error: <message>`` on one line, without unsafe loading advice."""
    if isinstance(error, OSError) and error.strerror is not None:
        message = os_error_message(error)
    else:
        message = str(error) or type(error).__name__
    return "error: " + " ".join(scrub_unsafe_advice(message).split())


def command_boundary(*expected: type[BaseException]) -> Callable[[Main], Main]:
    """Decorate a command's ``main(argv) -> int``: ``expected`` errors -> one line + exit 2.

    ``KeyboardInterrupt`` returns 130 (the shell's code for SIGINT) without a traceback.
    """

    def decorate(main: Main) -> Main:
        @functools.wraps(main)
        def wrapper(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except expected as error:
                print(error_line(error), file=sys.stderr)
                return EXIT_INPUT_ERROR
            except KeyboardInterrupt:
                return EXIT_INTERRUPTED

        return wrapper  # type: ignore[return-value]

    return decorate
