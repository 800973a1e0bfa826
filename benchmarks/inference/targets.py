"""What the measured rows add up to: speed-ups over the eager full model, multi-way vs naive
N x 1-way comparisons, and the DESIGN.md section 6 targets (H100, 473 x 473, N = 2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .context import measured

TARGET_DEVICE = "H100"
# (multi-way row, its naive N x 1-way twin in the same configuration), best first
NAIVE_PAIRS = (
    ("decoder_cudagraph_fp16", "naive_decoder_cudagraph_fp16"),
    ("decoder_eager_fp32", "naive_decoder_eager_fp32"),
    ("full_eager_fp32", "naive_full_eager_fp32"),
)


def add_ratios(rows: list[dict]) -> list[dict]:
    """Speed-up over the eager full model (same N, B) and multi-way vs naive (same config)."""
    index = {(r["variant"], r["way"], r["batch"]): r for r in rows}
    for row in rows:
        full = index.get(("full_eager_fp32", row["way"], row["batch"]))
        if measured(row) and measured(full):
            row["speedup_vs_full_eager"] = full["timing"]["median_ms"] / row["timing"]["median_ms"]
    comparisons = []
    for multi_name, naive_name in NAIVE_PAIRS:
        for row in rows:
            if row["variant"] != multi_name:
                continue
            naive = index.get((naive_name, row["way"], row["batch"]))
            if measured(row) and measured(naive):
                ratio = naive["timing"]["median_ms"] / row["timing"]["median_ms"]
                row["multiway_vs_naive"] = ratio
                comparisons.append(
                    {
                        "multi_way": multi_name,
                        "naive": naive_name,
                        "way": row["way"],
                        "batch": row["batch"],
                        "multi_way_ms": row["timing"]["median_ms"],
                        "naive_ms": naive["timing"]["median_ms"],
                        "ratio": ratio,
                    }
                )
    return comparisons


def _best(rows: list[dict], way: int, batch: int, accept: Callable[[dict], bool]) -> dict | None:
    """The fastest measured row at (``way``, ``batch``) that ``accept`` takes, or None."""
    candidates = [
        r for r in rows if measured(r) and r["way"] == way and r["batch"] == batch and accept(r)
    ]
    return min(candidates, key=lambda r: r["timing"]["median_ms"], default=None)


def evaluate_targets(rows: list[dict], info: dict[str, Any], ways: list[int]) -> list[dict]:
    """DESIGN.md section 6, on one H100, 473 x 473, 2-way, prototypes cached, batch 1."""
    gpu = info.get("gpu")
    where = gpu or f"the CPU ({info.get('cpu')})"
    on_gpu = gpu is not None
    decoder_groups = ("torch decoder", "torch optimised", "onnxruntime", "tensorrt")
    decoder = lambda r: r["group"] in decoder_groups  # noqa: E731
    fp16_decoder = lambda r: decoder(r) and r["precision"] == "fp16"  # noqa: E731
    e2e = lambda r: r["group"] == "end to end"  # noqa: E731
    index = {(r["variant"], r["way"], r["batch"]): r for r in rows}
    targets = []

    def add(
        name: str,
        required: str,
        value: float | None,
        unit: str,
        ok: bool | None,
        row: dict | None,
        note: str = "",
        missing: str = "",
    ) -> None:
        """Record one target: met / not met on a GPU, else why it is not measured."""
        if value is None:
            status = f"not measured: {missing or 'no row of this kind was measured'}"
        elif not on_gpu:
            status = f"not measured: the target is for an {TARGET_DEVICE}; this run is on {where}"
        else:
            status = "met" if ok else "not met"
            if TARGET_DEVICE not in (gpu or ""):
                note = (note + "; " if note else "") + f"measured on {gpu}, target set for H100"
        targets.append(
            {
                "target": name,
                "required": required,
                "value": value,
                "unit": unit,
                "status": status,
                "row": row["variant"] if row else None,
                "note": note,
            }
        )

    best = _best(rows, 2, 1, fp16_decoder)
    add(
        "query decoder GPU time, FP16, N=2, batch 1",
        "<= 1.5 ms",
        best["timing"]["median_ms"] if best else None,
        "ms",
        best is not None and best["timing"]["median_ms"] <= 1.5,
        best,
        "fastest FP16 decoder row (frames already on the device)",
    )
    best_e2e = _best(rows, 2, 1, e2e)
    add(
        "end to end, uint8 frame in host memory -> label map in host memory, N=2, batch 1",
        "<= 3 ms",
        best_e2e["timing"]["median_ms"] if best_e2e else None,
        "ms",
        best_e2e is not None and best_e2e["timing"]["median_ms"] <= 3.0,
        best_e2e,
    )
    best8 = _best(rows, 2, 8, lambda r: decoder(r) or e2e(r))
    add(
        "throughput at batch 8, N=2",
        ">= 2000 frames/s",
        best8["frames_per_s"] if best8 else None,
        "frames/s",
        best8 is not None and best8["frames_per_s"] >= 2000,
        best8,
        "fastest decoder or end-to-end row at batch 8",
        missing="no batch-8 row at N=2 was measured",
    )
    full = index.get(("full_eager_fp32", 2, 1))
    fast = best_e2e or best
    value = (
        full["timing"]["median_ms"] / fast["timing"]["median_ms"]
        if measured(full) and fast
        else None
    )
    add(
        "speed-up per frame over the PyTorch eager FP32 full model, N=2, batch 1",
        ">= 15x",
        value,
        "x",
        value is not None and value >= 15,
        fast,
        "full model time / fastest end-to-end row (the full model's frames are already on the "
        "device, so this is conservative)"
        if best_e2e
        else "full model time / fastest decoder row (no end-to-end row was measured)",
    )
    for way, required in ((2, 1.8), (5, 4.0)):
        pair = None
        for multi_name, _ in NAIVE_PAIRS[:2]:
            multi = index.get((multi_name, way, 1))
            if measured(multi) and "multiway_vs_naive" in multi:
                pair = multi
                break
        add(
            f"multi-way decoding vs naive N x 1-way, N={way}, batch 1",
            f">= {required}x",
            pair["multiway_vs_naive"] if pair else None,
            "x",
            pair is not None and pair["multiway_vs_naive"] >= required,
            pair,
            "same configuration on both sides" if pair else "",
            missing=("N=5 not in --ways" if way not in ways else ""),
        )
    return targets
