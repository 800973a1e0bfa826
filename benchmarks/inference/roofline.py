"""The floor of every row: the machine's ceilings measured in the same run (matrix-product rate
per dtype, copy bandwidths) and the lower bound on a row's time they give,
max(FLOPs / matrix peak, bytes / copy bandwidth[, host transfer / PCIe bandwidth])."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from .._common import time_calls
from .context import Env, measured, progress
from .variants import VARIANT_BY_NAME, Variant
from .workload import WayContext


def best_ms(fn: Callable[[], object], cuda: bool, warmup: int = 3, repeats: int = 10) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` after ``warmup``, in ms."""
    stats = time_calls(fn, warmup, repeats, cuda)
    return stats["min_ms"]


def measure_ceilings(device: torch.device) -> dict[str, Any]:
    """Matrix-product rate per dtype and copy bandwidth, measured once (best of the repeats).

    GPU: 8192^3 products on random data, a 1 GiB device-to-device copy (bytes read + written),
    256 MiB host(pinned)-to-device and back. CPU: 768^3 products and a 64 MiB copy.
    """
    cuda = device.type == "cuda"
    if cuda:
        return _measure_ceilings(device, cuda)
    # CPU: the machine's ceiling whatever --threads the rows use: the best of one thread and of
    # every core (on a busy shared machine either can come out low).
    threads = torch.get_num_threads()
    try:
        best: dict[str, Any] | None = None
        for count in sorted({1, os.cpu_count() or threads}):
            torch.set_num_threads(count)
            again = _measure_ceilings(device, cuda)
            if best is None:
                best = again
            else:
                merge_ceilings(best, again)
    finally:
        torch.set_num_threads(threads)
    return best


def _measure_ceilings(device: torch.device, cuda: bool) -> dict[str, Any]:
    """One measurement of the ceilings at the current thread count (see measure_ceilings)."""
    n = 8192 if cuda else 768
    generator = torch.Generator(device=device).manual_seed(0)
    rates: dict[str, float] = {}
    dtypes = {
        "fp32": torch.float32,
        "tf32": torch.float32,
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
    }
    if not cuda:  # no TF32 on CPUs; FP16 products fall back to a slow path (no FP16 unit)
        dtypes.pop("tf32")
        dtypes.pop("fp16")
    previous = torch.backends.cuda.matmul.allow_tf32
    for name, dtype in dtypes.items():
        a = torch.randn(n, n, device=device, generator=generator).to(dtype)
        b = torch.randn(n, n, device=device, generator=generator).to(dtype)
        try:
            torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
            ms = best_ms(lambda a=a, b=b: torch.mm(a, b), cuda, repeats=10 if cuda else 30)
            rates[name] = 2 * n**3 / (ms * 1e-3) / 1e12
        except RuntimeError as error:  # a dtype without a kernel here
            rates[name] = float("nan")
            progress(f"  matmul {name}: {error}")
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        a = b = None  # free before the next dtype
    copies: dict[str, float] = {}
    size = (1 << 30) if cuda else (64 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device).random_(generator=generator)
    dst = torch.empty_like(src)
    ms = best_ms(lambda: dst.copy_(src), cuda, repeats=10 if cuda else 20)
    copies["device_to_device"] = 2 * size / (ms * 1e-3) / 1e9  # read + write
    src = dst = None
    if cuda:
        size = 256 << 20
        host = torch.empty(size, dtype=torch.uint8, pin_memory=True).random_()
        dev = torch.empty(size, dtype=torch.uint8, device=device)
        ms = best_ms(lambda: dev.copy_(host, non_blocking=True), cuda)
        copies["host_to_device"] = size / (ms * 1e-3) / 1e9
        ms = best_ms(lambda: host.copy_(dev, non_blocking=True), cuda)
        copies["device_to_host"] = size / (ms * 1e-3) / 1e9
        del host, dev
        torch.cuda.empty_cache()
    else:  # frames already live in host memory: the "transfer" is a memcpy
        copies["host_to_device"] = copies["device_to_device"] / 2
        copies["device_to_host"] = copies["device_to_device"] / 2
    return {
        "matmul_tflops": rates,
        "copy_gb_per_s": copies,
        "method": (
            f"best of repeated {n}^3 torch.mm per dtype on random data; copies of "
            f"{'1 GiB (device), 256 MiB pinned (host)' if cuda else '64 MiB'}; "
            "device-to-device counts bytes read + written; measured at the start and "
            "the end of the run, the larger value kept"
            + ("" if cuda else f"; CPU: the best of 1 and {os.cpu_count()} threads")
        ),
    }


def merge_ceilings(ceilings: dict[str, Any], again: dict[str, Any]) -> None:
    """Keep the larger of two measurements of every ceiling (a busy machine only lowers them)."""
    for group in ("matmul_tflops", "copy_gb_per_s"):
        for key, value in again[group].items():
            old = ceilings[group].get(key, float("nan"))
            ceilings[group][key] = value if old != old or value > old else old


def peak_tflops(ceilings: dict[str, Any], precision: str) -> float:
    """The fastest measured matrix rate usable at ``precision`` (a lower bound on time)."""
    rates = ceilings["matmul_tflops"]
    usable = {
        "fp32": ("fp32", "tf32"),
        "fp16": ("fp16", "fp32", "tf32"),
        "bf16": ("bf16", "fp32", "tf32"),
    }[precision]
    values = [rates[k] for k in usable if k in rates and rates[k] == rates[k]]
    return max(values)


def floor_for(
    env: Env, variant: Variant, precision: str, ctx: WayContext, batch: int
) -> dict[str, Any]:
    """Lower bound on the time of one call: max(FLOPs / matrix peak, device bytes / copy
    bandwidth, host transfer / PCIe bandwidth for end-to-end rows).

    FLOPs: the row's algorithm per frame (the decoder counts the cheaper of the plain and the
    optimised decoder). Bytes: uint8 frame in + uint8 label map out (+ uint8 support images and
    masks for full-model rows) per frame, plus the weights read once per call, at 2 bytes per
    weight for FP16 / BF16 rows and 4 for FP32."""
    size = env.args.size
    work = variant.work
    flops_frame = ctx.flops[work]
    if work == "decoder" and "decoder_optimised" in ctx.flops:
        flops_frame = min(flops_frame, ctx.flops["decoder_optimised"])
    params = ctx.params["naive" if work.startswith("naive") else "model"]
    weight_bytes = params * (2 if precision in ("fp16", "bf16") else 4)
    frame_in, labels_out = size * size * 3, size * size
    io_bytes = batch * (frame_in + labels_out)
    if work in ("full", "naive_full"):
        io_bytes += batch * ctx.way * (frame_in + labels_out)
    copies = env.ceilings["copy_gb_per_s"]
    terms = {
        "compute_ms": flops_frame * batch / (peak_tflops(env.ceilings, precision) * 1e12) * 1e3,
        "memory_ms": (io_bytes + weight_bytes) / (copies["device_to_device"] * 1e9) * 1e3,
    }
    if variant.e2e:
        terms["transfer_ms"] = (
            batch * frame_in / (copies["host_to_device"] * 1e9)
            + batch * labels_out / (copies["device_to_host"] * 1e9)
        ) * 1e3
    bound = max(terms, key=terms.get)
    return {
        "flops_per_frame": flops_frame,
        "bytes_per_call": io_bytes + weight_bytes,
        **{k: v for k, v in terms.items()},
        "floor_ms": terms[bound],
        "bound": bound.replace("_ms", ""),
    }


def support_floor(
    ceilings: dict[str, Any], flops: int, precision: str, median_ms: float
) -> dict[str, Any]:
    """The compute floor of a support-encoding row of ``flops`` and its fraction of the time."""
    compute_ms = flops / (peak_tflops(ceilings, precision) * 1e12) * 1e3
    return {"floor_ms": compute_ms, "bound": "compute", "fraction": compute_ms / median_ms}


def refresh_floors(env: Env) -> None:
    """Recompute every floor with the final ceilings."""
    for row in env.rows:
        if measured(row):
            floor = floor_for(
                env,
                VARIANT_BY_NAME[row["variant"]],
                row["precision"],
                env.contexts[row["way"]],
                row["batch"],
            )
            floor["fraction"] = floor["floor_ms"] / row["timing"]["median_ms"]
            row["floor"] = floor
    for row in env.supports:
        if measured(row):
            row["floor"] = support_floor(
                env.ceilings, row["flops"], row["precision"], row["timing"]["median_ms"]
            )
