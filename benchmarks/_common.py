"""Helpers shared by the benchmarks (bench_inference, bench_ops, bench_runtime): timing,
statistics, versions, device description, the JSON result file.

Timing rules (DESIGN.md section 6, .library METHOD): warm up first; on CUDA, synchronise before
each call and time it with CUDA events recorded on the current stream (the host clock is read
too, so launch-bound calls show as such); on the CPU, ``time.perf_counter``. Statistics are the
median and the 10th / 90th percentiles over the timed calls.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

PACKAGES = (
    "torch",
    "torchvision",
    "numpy",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "triton",
    "opencv-python-headless",
    "matplotlib",
    "mfnet",
    "mfnet-runtime",
)


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (no interpolation: a measured value)."""
    return ordered[int(round(fraction * (len(ordered) - 1)))]


def summarize(samples_ms: list[float]) -> dict[str, float]:
    """Median, p10, p90, min, mean and count of a list of milliseconds."""
    ordered = sorted(samples_ms)
    return {
        "median_ms": statistics.median(ordered),
        "p10_ms": percentile(ordered, 0.1),
        "p90_ms": percentile(ordered, 0.9),
        "min_ms": ordered[0],
        "mean_ms": statistics.fmean(ordered),
        "n": len(ordered),
    }


def time_calls(
    call: Callable[[], object],
    warmup: int,
    iterations: int,
    cuda: bool,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Time ``call`` ``iterations`` times after ``warmup`` calls.

    On CUDA every call is bracketed by ``torch.cuda.synchronize()`` and two CUDA events on the
    current stream; the event time is the reported one (``timer: cuda_events``), the host time
    of the same calls is kept as ``host_median_ms``. ``max_seconds`` caps the timed loop (at
    least 5 calls); the count actually timed is ``n``.
    """
    for _ in range(warmup):
        call()
    if cuda:
        torch.cuda.synchronize()
    device_ms: list[float] = []
    host_ms: list[float] = []
    started = time.perf_counter()
    for index in range(iterations):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            host_start = time.perf_counter()
            begin.record()
            call()
            end.record()
            end.synchronize()
            host_ms.append((time.perf_counter() - host_start) * 1e3)
            device_ms.append(begin.elapsed_time(end))
        else:
            host_start = time.perf_counter()
            call()
            host_ms.append((time.perf_counter() - host_start) * 1e3)
        if max_seconds is not None and index >= 4 and time.perf_counter() - started > max_seconds:
            break
    stats = summarize(device_ms if cuda else host_ms)
    stats["timer"] = "cuda_events" if cuda else "perf_counter"
    stats["iterations_requested"] = iterations
    stats["warmup"] = warmup
    if cuda:
        stats["host_median_ms"] = statistics.median(host_ms)
    return stats


def _nvidia_smi(query: str) -> str | None:
    """The first GPU's answer to ``nvidia-smi --query-gpu=QUERY``; None if nvidia-smi is
    missing or fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0].strip() if out.strip() else None


def driver_version() -> str:
    """The NVIDIA driver version: nvidia-smi, else NVML (nvidia-ml-py), else 'unknown'."""
    found = _nvidia_smi("driver_version")
    if found:
        return found
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            value = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return value.decode() if isinstance(value, bytes) else str(value)
    except Exception:  # noqa: BLE001 - no NVML here
        return "unknown (neither nvidia-smi nor NVML answered)"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """Python and package versions (installed distributions only) plus torch's CUDA / cuDNN."""
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    found["torch_cuda"] = str(torch.version.cuda)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    found["cudnn"] = str(cudnn)
    try:
        import onnxruntime

        found["onnxruntime_module"] = onnxruntime.__version__
        found["onnxruntime_providers"] = ",".join(onnxruntime.get_available_providers())
    except ImportError:
        pass
    try:
        import tensorrt  # noqa: F401

        found["tensorrt_module"] = tensorrt.__version__
    except ImportError:
        pass
    return found


def device_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on: GPU name, driver, memory, or the CPU."""
    info: dict[str, Any] = {
        "device": device,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            {
                "gpu": torch.cuda.get_device_name(index),
                "compute_capability": list(torch.cuda.get_device_capability(index)),
                "multiprocessors": props.multi_processor_count,
                "gpu_memory_gib": round(props.total_memory / 2**30, 2),
                "driver": driver_version(),
                "nvidia_smi_clocks": _nvidia_smi("clocks.sm,clocks.max.sm,clocks.mem"),
                "nvidia_smi_power": _nvidia_smi("power.draw,power.limit"),
            }
        )
    return info


def now_utc() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` as indented JSON (non-JSON values as str), folders created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
