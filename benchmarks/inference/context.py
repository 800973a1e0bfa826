"""What one run of the inference benchmark shares: its options, device, time budget, measured
ceilings, the per-N workloads and the rows so far (``Env``); the contract of a ready-to-time row
(``Prepared``) and of a row that cannot run here (``NotMeasured``); the progress lines.

Device / version description and the timing itself are ``benchmarks/_common.py``'s, shared with
the other benchmarks.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mfnet.model.mfnet import MFNet

from .workload import WayContext


class NotMeasured(Exception):
    """A row that cannot run here; the message is the reason recorded in the table."""


class Budget:
    """The wall-clock budget of a run (``--time-budget-s``; None: unlimited)."""

    def __init__(self, seconds: float | None) -> None:
        """Start the clock now."""
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        """Seconds left (inf without a budget; negative once overrun)."""
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def allows(self, cost_s: float) -> bool:
        """Whether a task of about ``cost_s`` seconds still fits."""
        return self.remaining() > cost_s


def progress(message: str) -> None:
    """One progress line of the run on stdout, flushed (gpu_check.sh shows its log live)."""
    print(message, flush=True)


@dataclass
class Prepared:
    """A ready-to-time row: ``call()`` returns the labels [B, S, S] (tensor or array)."""

    call: Callable[[], Any]
    memory: str = "torch"  # torch: peak allocated by the row; device: drop of free device memory
    resident_bytes: int = 0  # memory the row uses that was allocated before it (shared models)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], None] | None = None
    after: Callable[[], list[str]] | None = None  # notes known only after timing


@dataclass
class Env:
    """The state of one run, handed to every row builder and runner."""

    args: argparse.Namespace
    device: torch.device
    budget: Budget
    ceilings: dict[str, Any] = field(default_factory=dict)
    ort_reason: str | None = None  # None: ONNX Runtime usable on this device
    trt_reason: str | None = None  # None: TensorRT usable
    compiled: dict[tuple, Any] = field(default_factory=dict)  # compiled fns, TRT build times
    contexts: dict[int, WayContext] = field(default_factory=dict)
    naive: MFNet | None = None  # the 1-way model of the naive rows (shared by every N)
    rows: list[dict[str, Any]] = field(default_factory=list)
    supports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        """Whether this run is on a CUDA device."""
        return self.device.type == "cuda"

    def selected(self, name: str) -> bool:
        """Whether --variants / --skip-variants let the row ``name`` run."""
        patterns = self.args.variant_patterns
        chosen = not patterns or any(fnmatch.fnmatch(name, p) for p in patterns)
        return chosen and not any(fnmatch.fnmatch(name, p) for p in self.args.skip_patterns)


def measured(row: dict | None) -> bool:
    """Whether a result row (table or support encoding) was measured."""
    return row is not None and row.get("status") == "measured"
