"""Running one row: pick its builder, time it, and record its result (timing, frames/s, floor,
memory, label agreement with the FP32 reference) or the reason it did not run; the same for the
support-encoding rows."""

from __future__ import annotations

import gc
import time
import traceback
from typing import Any

import numpy as np
import torch

from .._common import time_calls
from .context import Env, NotMeasured, Prepared, progress
from .deployment_rows import e2e_runtime_row, ort_row, runtime_support_row, trt_row
from .roofline import floor_for, support_floor
from .torch_rows import compile_row, e2e_torch_row, full_row, torch_decoder_row, torch_support_row
from .variants import TOLERANCE, Variant, resolve_precision
from .workload import WayContext


def build_row(env: Env, variant: Variant, ctx: WayContext, batch: int) -> Prepared:
    """The ``Prepared`` row of ``variant`` at N = ctx.way and batch ``batch`` (its name says
    which builder, precision, layout and graph mode)."""
    name = variant.name
    precision = resolve_precision(variant, env.cuda)
    if name == "full_eager_fp32":
        return full_row(env, ctx, batch, naive=False)
    if name == "naive_full_eager_fp32":
        return full_row(env, ctx, batch, naive=True)
    if name == "e2e_torch":
        return e2e_torch_row(env, ctx, batch)
    if name == "e2e_runtime_ort":
        return e2e_runtime_row(env, ctx, batch)
    if name.startswith("ort_"):
        return ort_row(env, ctx, batch, precision, name.endswith("cudagraph"))
    if name.startswith("trt_"):
        return trt_row(env, ctx, batch, precision)
    kind = name.split("_", 1)[0]  # decoder | opt | naive
    kind = {"decoder": "plain", "opt": "opt", "naive": "naive"}[kind]
    if "compile" in name:
        return compile_row(env, ctx, batch, kind, graph=name.endswith("cudagraph_fp16"))
    layout = precision != "fp32" and "amp_fp16" not in name and "amp_bf16" not in name
    if kind == "opt" and name == "opt_amp_fp16":
        layout = True
    return torch_decoder_row(env, ctx, batch, kind, precision, layout, graph="cudagraph" in name)


def as_numpy(labels: Any) -> np.ndarray:
    """Labels [B, S, S] of a row (tensor on any device, or array) as a host array."""
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy()
    return np.asarray(labels)


def memory_snapshot(cuda: bool, collect: bool = False) -> dict[str, int] | None:
    """Free what the last row left (``collect``) and start a peak-memory window (CUDA)."""
    if not cuda:
        return None
    if collect:
        gc.collect()  # CUDA graphs and model copies in reference cycles
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return {"allocated": torch.cuda.memory_allocated(), "free": torch.cuda.mem_get_info()[0]}


def memory_used(before: dict[str, int] | None, prepared: Prepared) -> dict[str, Any] | None:
    """The device memory a row used since ``before`` (None on the CPU), as its ``memory`` says."""
    if before is None:
        return None
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before["allocated"] + prepared.resident_bytes
    device_drop = before["free"] - torch.cuda.mem_get_info()[0]
    mib = (peak if prepared.memory == "torch" else device_drop) / 2**20
    return {
        "mib": round(mib, 1),
        "measure": (
            "torch.cuda.max_memory_allocated during set-up + timing (weights, "
            "activations, workspace, CUDA-graph pool)"
            if prepared.memory == "torch"
            else "drop of free device memory (torch.cuda.mem_get_info) from before the "
            "session / engine was created to after timing"
        ),
        "torch_peak_allocated_mib": round(peak / 2**20, 1),
        "device_free_drop_mib": round(device_drop / 2**20, 1),
    }


def agreement(
    variant: Variant, precision: str, labels: np.ndarray, reference: np.ndarray
) -> dict[str, Any] | None:
    """Fraction of labels [B, S, S] equal to the FP32 reference and whether it meets the
    tolerance of ``precision``; naive rows do not apply (a different model)."""
    if variant.work.startswith("naive"):
        return {
            "applies": False,
            "note": "a different model (1-way, run N times): its labels "
            "are not expected to equal the N-way model's",
        }
    if labels.shape != reference.shape:
        return {
            "applies": True,
            "identical_fraction": 0.0,
            "threshold": TOLERANCE[precision],
            "passed": False,
            "note": f"shape {labels.shape} != {reference.shape}",
        }
    fraction = float((labels == reference).mean())
    return {
        "applies": True,
        "identical_fraction": fraction,
        "threshold": TOLERANCE[precision],
        "passed": fraction >= TOLERANCE[precision],
        "reference": "decode_query, eager FP32 with TF32 off, same frames",
    }


def skip_reason(env: Env, name: str, cuda_only: bool) -> str | None:
    """Why the row ``name`` is not run (row selection, CUDA only on a CPU run), or None."""
    if not env.selected(name):
        return "not measured: excluded by --variants / --skip-variants"
    if cuda_only and not env.cuda:
        return "not measured: needs CUDA (this run is on the CPU)"
    return None


def short_error(error: BaseException) -> str:
    """The status of a failed row: ``failed: Type: first line of the message``."""
    text = str(error).strip().splitlines()
    return f"failed: {type(error).__name__}" + (f": {text[0][:300]}" if text else "")


def close_row(prepared: Prepared | None) -> None:
    """Close a row's sessions / engines, if it has any (a failing close is ignored)."""
    if prepared is not None and prepared.close is not None:
        try:
            prepared.close()
        except Exception:  # noqa: BLE001 - a failing close must not end the table
            pass


def run_row(env: Env, variant: Variant, way: int, batch: int) -> dict[str, Any]:
    """The result row of ``variant`` at N = ``way``, batch ``batch``: measured, or why not."""
    precision = resolve_precision(variant, env.cuda)
    row: dict[str, Any] = {
        "variant": variant.name,
        "label": variant.label,
        "group": variant.group,
        "way": way,
        "batch": batch,
        "precision": precision,
        "end_to_end": variant.e2e,
    }
    ctx = env.contexts.get(way)
    reason = skip_reason(env, variant.name, variant.cuda_only)
    if reason is None and ctx is None:
        reason = "skipped: budget (the model set-up of this N did not run)"
    if reason is None and not env.budget.allows(variant.cost_s):
        reason = "skipped: budget"
    if reason is not None:
        row["status"] = reason
        return row
    before = memory_snapshot(env.cuda)
    prepared: Prepared | None = None
    started = time.perf_counter()
    try:
        prepared = build_row(env, variant, ctx, batch)
        setup_s = time.perf_counter() - started
        cap = min(env.args.max_row_s, max(2.0, env.budget.remaining() / 4))
        timing = time_calls(prepared.call, env.args.warmup, env.args.iterations, env.cuda, cap)
        labels = as_numpy(prepared.call())
        memory = memory_used(before, prepared)
    except NotMeasured as error:
        row["status"] = str(error)
    except Exception as error:  # noqa: BLE001 - one broken row must not end the table
        row["status"] = short_error(error)
        row["traceback"] = traceback.format_exc(limit=8)
    else:
        median = timing["median_ms"]
        floor = floor_for(env, variant, precision, ctx, batch)
        floor["fraction"] = floor["floor_ms"] / median
        row.update(
            status="measured",
            timing=timing,
            setup_s=round(setup_s, 2),
            per_frame_ms=median / batch,
            frames_per_s=1e3 * batch / median,
            floor=floor,
            memory=memory,
            agreement=agreement(variant, precision, labels, ctx.reference[batch]),
            notes=prepared.notes + (prepared.after() if prepared.after else []),
            **prepared.extra,
        )
    finally:
        close_row(prepared)
        del prepared  # before the collection: the row's buffers and graphs go with it
        memory_snapshot(env.cuda, collect=True)
    show = (
        f"{row['timing']['median_ms']:9.3f} ms (p10 {row['timing']['p10_ms']:.3f}, "
        f"p90 {row['timing']['p90_ms']:.3f}, n {row['timing']['n']})"
        if row["status"] == "measured"
        else row["status"]
    )
    progress(f"[{env.budget.elapsed():7.1f} s] N={way} B={batch} {variant.name:<32} {show}")
    return row


def run_support(env: Env, name: str, way: int, shots: int) -> dict[str, Any]:
    """Cost of encoding one support set of N classes x K shots (paid once, then cached)."""
    precision = (
        "fp16"
        if name == "support_torch_amp_fp16"
        else ("fp32" if name == "support_torch_fp32" or not env.cuda else "fp16")
    )
    row: dict[str, Any] = {"variant": name, "way": way, "shot": shots, "precision": precision}
    ctx = env.contexts.get(way)
    reason = skip_reason(env, name, False)
    if reason is None and name == "support_runtime_ort" and env.ort_reason:
        reason = env.ort_reason
    if reason is None and (ctx is None or not env.budget.allows(5.0)):
        reason = "skipped: budget"
    if reason is not None:
        row["status"] = reason
        return row
    before = memory_snapshot(env.cuda)
    prepared: Prepared | None = None
    try:
        prepared = (
            runtime_support_row(env, ctx, shots)
            if name == "support_runtime_ort"
            else torch_support_row(env, ctx, shots, precision)
        )
        iterations = max(3, env.args.iterations // 5)
        timing = time_calls(
            prepared.call,
            2,
            iterations,
            env.cuda,
            min(env.args.max_row_s, max(2.0, env.budget.remaining() / 8)),
        )
        memory = memory_used(before, prepared)
    except NotMeasured as error:
        row["status"] = str(error)
    except Exception as error:  # noqa: BLE001 - one broken row must not end the table
        row["status"] = short_error(error)
        row["traceback"] = traceback.format_exc(limit=8)
    else:
        flops = ctx.flops["support_shot"] * way * shots
        row.update(
            status="measured",
            timing=timing,
            memory=memory,
            notes=prepared.notes,
            flops=flops,
            floor=support_floor(env.ceilings, flops, precision, timing["median_ms"]),
        )
    finally:
        close_row(prepared)
        del prepared  # before the collection: the row's buffers and graphs go with it
        memory_snapshot(env.cuda, collect=True)
    show = f"{row['timing']['median_ms']:9.3f} ms" if row["status"] == "measured" else row["status"]
    progress(f"[{env.budget.elapsed():7.1f} s] N={way} K={shots} {name:<32} {show}")
    return row
