"""How many intra-op threads a process should use: the cores actually free to it.

Libraries default to one thread per core of the machine (torch, ONNX Runtime). With anything
else running (a data-loader worker, another program) those threads oversubscribe the cores and
every parallel region waits for its slowest thread, which is descheduled: a 10 ms call then takes
hundreds. The policy here counts the cores this process may run on (``os.sched_getaffinity``,
which honours ``taskset`` and container CPU sets), subtracts the data-loader worker processes
that will compete for them and the cores that other programs keep busy when it starts (the
fewest runnable tasks in a few samples of ``/proc/loadavg`` over 40 ms, so a momentary spike does
not count), and never goes below one. An explicit request wins. Load that starts later is not
seen: ``--threads 1`` is the safe choice on a machine that is always shared.

This is the project's one definition of the policy: the runtime applies it to ONNX Runtime's
sessions and ``mfnet`` (training, evaluation, prediction, benchmarks) to torch.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import options
from .errors import RuntimeInputError


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def busy_cores(
    loadavg: str | Path = "/proc/loadavg", samples: int = 5, interval_s: float = 0.01
) -> int:
    """Cores that other processes keep busy now: the fewest runnable tasks over ``samples``
    readings of ``loadavg`` (its fourth field, ``running/total``), less the one reading it.

    0 where the file does not exist or cannot be parsed (not Linux): the policy then counts
    only the data-loader workers.
    """
    fewest = None
    for index in range(samples):
        try:
            running = int(Path(loadavg).read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        fewest = running if fewest is None else min(fewest, running)
        if index + 1 < samples:
            time.sleep(interval_s)
    return max(0, (fewest or 0) - 1)


@dataclass(frozen=True)
class ThreadPolicy:
    """The chosen intra-op thread count and what it was computed from."""

    threads: int
    cores: int
    workers: int
    requested: bool  # True when given explicitly (``--threads``), not computed
    busy: int = 0  # cores other processes kept busy when the policy was computed

    def describe(self) -> str:
        """One log line, e.g. ``threads: 1 (2 cores, 1 loader workers)``."""
        busy = f", {self.busy} busy with other processes" if self.busy else ""
        source = ", set by --threads" if self.requested else ""
        return (
            f"threads: {self.threads} ({self.cores} cores, {self.workers} loader workers"
            f"{busy}{source})"
        )


def thread_policy(
    requested: int | None = None,
    workers: int = 0,
    cores: int | None = None,
    busy: int | None = None,
) -> ThreadPolicy:
    """Intra-op threads for one process: ``requested`` when given, else the free cores.

    Args:
        requested: an explicit thread count (>= 1), or None to compute it.
        workers: data-loader worker processes that run beside this one (>= 0).
        cores: cores this process may use; None = ``available_cores()``.
        busy: cores kept busy by other processes; None = ``busy_cores()`` (not measured when
            a count is requested).
    Returns:
        a ``ThreadPolicy`` with ``threads = max(1, cores - workers - busy)`` unless requested.
    """
    cores = available_cores() if cores is None else int(cores)
    if workers < 0:
        raise RuntimeInputError(f"data-loader workers must be >= 0, got {workers}")
    if requested is not None:
        if isinstance(requested, bool) or int(requested) != requested or requested < 1:
            raise RuntimeInputError(f"threads must be an integer >= 1, got {requested!r}")
        return ThreadPolicy(int(requested), cores, workers, True)
    busy = busy_cores() if busy is None else max(0, int(busy))
    return ThreadPolicy(max(1, cores - workers - busy), cores, workers, False, busy)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: the intra-op thread count; default from the free cores."""
    parser.add_argument(
        "--threads",
        type=options.integer(minimum=1),
        default=None,
        metavar="N",
        help="intra-op threads of the inference / training library (default: the cores free "
        "to this process, i.e. its CPU affinity minus the data-loader workers and the cores "
        "other processes keep busy at start, at least 1)",
    )
