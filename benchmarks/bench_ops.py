"""Benchmark of the custom ops of ``mfnet_ext`` against their PyTorch references (issue 4).

    python benchmarks/bench_ops.py --device cuda            # the paper's sizes, on the GPU
    python benchmarks/bench_ops.py --device cpu --channels 8 --feature-size 9 --mask-size 33 \\
        --batches 2 --ways 1 --shots 1 --sampler-batches 2 --sampler-ways 1 --sampler-size 8

Sections (both implementations timed in the same run, on the same inputs):

- ``pooling``: masked global pooling of the support shots,
  ``mfnet_ext.masked_pooling.masked_global_pool`` (fused kernel) vs
  ``mfnet.ops.masked_pooling.masked_global_pool_reference``, forward alone (no autograd) and
  forward + backward (gradient with respect to the features). Paper sizes: C = 256 channels,
  60 x 60 features, 473 x 473 masks, M = batch x N x K shots with N in {1, 2, 5}, K in {1, 5},
  batch in {4, 8}; float32, float16 and bfloat16 features.
  Target (DESIGN.md section 6): forward + backward >= 3x the reference.
- ``sampler``: the PML triplet sampler, ``mfnet.ops.triplet_sampling.sample_triplets`` with
  ``impl="cuda"`` vs ``impl="reference"`` ("spatial" mode, Nt = 20, the label checks included,
  as training calls it), batch in {4, 8}, N in {1, 2, 5}, 60 x 60 labels. Target: >= 20x.

Timing (benchmarks/_common.py): warm-up calls, then CUDA events on the current stream around
each call (synchronised before), or ``time.perf_counter`` on the CPU; median, p10, p90. Each row
records the speed-up = reference median / kernel median, and the largest difference between the
two outputs. On the CPU, "kernel" is the extension's C++ CPU twin: that run checks the script,
its numbers say nothing about the GPU. Output: ``<out>/bench_ops_<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
for _path in (BENCH_DIR, REPO, REPO / "cuda_ext"):  # runnable from a plain checkout
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _common import device_info, now_utc, time_calls, versions, write_json  # noqa: E402
from mfnet.threads import add_threads_argument, set_torch_threads  # noqa: E402

POOLING_TARGET = 3.0  # forward + backward, DESIGN.md section 6
SAMPLER_TARGET = 20.0
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--sections",
        default="pooling,sampler",
        help="comma-separated sections to run (default: pooling,sampler)",
    )
    parser.add_argument("--channels", type=int, default=256, help="C (default 256)")
    parser.add_argument("--feature-size", type=int, default=60, help="h = w (default 60)")
    parser.add_argument("--mask-size", type=int, default=473, help="H = W (default 473)")
    parser.add_argument("--batches", default="4,8", help="episodes per batch (default 4,8)")
    parser.add_argument("--ways", default="1,2,5", help="N (default 1,2,5)")
    parser.add_argument("--shots", default="1,5", help="K (default 1,5)")
    parser.add_argument(
        "--dtypes", default="float32,float16,bfloat16", help="feature dtypes of the pooling rows"
    )
    parser.add_argument("--sampler-batches", default="4,8", help="B of the sampler rows")
    parser.add_argument("--sampler-ways", default="1,2,5", help="N of the sampler rows")
    parser.add_argument("--sampler-size", type=int, default=60, help="label side (default 60)")
    parser.add_argument("--triplets", type=int, default=20, help="Nt (default 20)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up calls per timing")
    parser.add_argument("--iterations", type=int, default=50, help="timed calls per timing")
    parser.add_argument(
        "--max-row-s",
        type=float,
        default=10.0,
        help="cap on the timed loop of one timing (at least 5 calls)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument(
        "--name", default=None, help="result file stem (default bench_ops_<device>)"
    )
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - {"pooling", "sampler"}
    if unknown:
        parser.error(f"unknown sections: {sorted(unknown)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu)")
    return args


def _timer(
    args: argparse.Namespace, device: torch.device
) -> Callable[[Callable[[], object]], dict]:
    def timed(call: Callable[[], object]) -> dict[str, Any]:
        return time_calls(
            call,
            args.warmup,
            args.iterations,
            cuda=device.type == "cuda",
            max_seconds=args.max_row_s,
        )

    return timed


def random_masks(count: int, side: int, device: torch.device, generator: torch.Generator):
    """[count, side, side] bool: one random rectangle (5-60 % of the side) per mask."""
    low = torch.rand(count, 2, generator=generator) * 0.5  # [M, 2] top-left corner fractions
    extent = 0.05 + torch.rand(count, 2, generator=generator) * 0.55  # [M, 2]
    high = (low + extent).clamp(max=1.0)
    coords = (torch.arange(side) + 0.5) / side  # [side]
    inside_y = (coords[None] >= low[:, :1]) & (coords[None] < high[:, :1])  # [M, side]
    inside_x = (coords[None] >= low[:, 1:]) & (coords[None] < high[:, 1:])  # [M, side]
    return (inside_y[:, :, None] & inside_x[:, None, :]).to(device)  # [M, side, side]


def pooling_rows(args: argparse.Namespace, device: torch.device, extension) -> list[dict]:
    from mfnet.ops.masked_pooling import masked_global_pool_reference

    timed = _timer(args, device)
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for batch in _ints(args.batches):
            for way in _ints(args.ways):
                for shot in _ints(args.shots):
                    shots = batch * way * shot
                    features = torch.randn(
                        shots,
                        args.channels,
                        args.feature_size,
                        args.feature_size,
                        generator=generator,
                    )
                    features = features.to(device=device, dtype=dtype)
                    masks = random_masks(shots, args.mask_size, device, generator)
                    grad_out = torch.randn(shots, args.channels, generator=generator)
                    grad_out = grad_out.to(device=device, dtype=dtype)
                    base = {
                        "op": "masked_global_pool",
                        "dtype": dtype_name,
                        "batch": batch,
                        "way": way,
                        "shot": shot,
                        "M": shots,
                        "C": args.channels,
                        "feature_size": args.feature_size,
                        "mask_size": args.mask_size,
                    }
                    impls = {"reference": masked_global_pool_reference}
                    if extension is not None:
                        impls["kernel"] = extension.ops.masked_global_pool
                    rows.append(_pooling_forward(base, impls, features, masks, timed))
                    rows.append(_pooling_backward(base, impls, features, masks, grad_out, timed))
                    del features, masks, grad_out
    return rows


def _pooling_forward(base: dict, impls: dict, features, masks, timed) -> dict:
    row = dict(base, **{"pass": "forward"})
    outputs = {}
    with torch.no_grad():
        for name, pool in impls.items():
            outputs[name] = pool(features, masks)
            row[name] = timed(lambda pool=pool: pool(features, masks))
    return _compare(row, outputs, target=None)


def _pooling_backward(base: dict, impls: dict, features, masks, grad_out, timed) -> dict:
    row = dict(base, **{"pass": "forward_backward"})
    leaf = features.detach().requires_grad_()
    grads = {}

    def step(pool: Callable) -> torch.Tensor:
        leaf.grad = None
        pool(leaf, masks).backward(grad_out)
        return leaf.grad

    for name, pool in impls.items():
        grads[name] = step(pool).clone()
        row[name] = timed(lambda pool=pool: step(pool))
    leaf.grad = None
    return _compare(row, grads, target=POOLING_TARGET)


def _compare(row: dict, outputs: dict, target: float | None) -> dict:
    if "kernel" not in outputs:
        row["kernel"] = "not measured: the mfnet_ext extension is unavailable"
        return row
    reference, kernel = outputs["reference"].float(), outputs["kernel"].float()
    row["max_abs_diff"] = (reference - kernel).abs().max().item() if reference.numel() else 0.0
    row["speedup"] = row["reference"]["median_ms"] / row["kernel"]["median_ms"]
    if target is not None:
        row["target_speedup"] = target
        row["meets_target"] = row["speedup"] >= target
    return row


def sampler_rows(args: argparse.Namespace, device: torch.device, extension) -> list[dict]:
    from mfnet.ops.triplet_sampling import sample_triplets

    timed = _timer(args, device)
    generator = torch.Generator().manual_seed(args.seed + 1)
    side = args.sampler_size
    rows = []
    for batch in _ints(args.sampler_batches):
        for way in _ints(args.sampler_ways):
            target = torch.randint(0, way + 1, (batch, side, side), generator=generator)
            target[torch.rand(batch, side, side, generator=generator) < 0.05] = 255
            pred = torch.where(
                torch.rand(batch, side, side, generator=generator) < 0.7,
                target.clamp(max=way),
                torch.randint(0, way + 1, (batch, side, side), generator=generator),
            )
            pred, target = pred.to(device), target.to(device)
            row: dict[str, Any] = {
                "op": "sample_triplets",
                "positive_mode": "spatial",
                "batch": batch,
                "way": way,
                "size": side,
                "triplets": args.triplets,
            }
            sample_generator = torch.Generator(device=device).manual_seed(args.seed)
            impls = ["reference"] + (["cuda"] if extension is not None else [])
            valid = {}
            for impl in impls:

                def call(
                    impl: str = impl,
                    pred: torch.Tensor = pred,
                    target: torch.Tensor = target,
                    way: int = way,
                    generator: torch.Generator = sample_generator,
                ):
                    return sample_triplets(
                        pred, target, way, args.triplets, "spatial", 0.1, generator, impl=impl
                    )

                try:
                    valid[impl] = call().valid.float().mean().item()
                    row["reference" if impl == "reference" else "kernel"] = timed(call)
                except Exception as error:  # noqa: BLE001 - recorded in the JSON, run goes on
                    row["reference" if impl == "reference" else "kernel"] = (
                        f"failed: {type(error).__name__}: {error}"
                    )
                    traceback.print_exc()
            if extension is not None and isinstance(row.get("kernel"), dict):
                # the label-value checks cost device syncs; the kernel alone is timed without them
                def unchecked(
                    pred: torch.Tensor = pred,
                    target: torch.Tensor = target,
                    way: int = way,
                    generator: torch.Generator = sample_generator,
                ):
                    return sample_triplets(
                        pred,
                        target,
                        way,
                        args.triplets,
                        "spatial",
                        0.1,
                        generator,
                        impl="cuda",
                        check_labels=False,
                    )

                row["kernel_unchecked"] = timed(unchecked)
            if extension is None:
                row["kernel"] = "not measured: the mfnet_ext extension is unavailable"
            elif isinstance(row.get("kernel"), dict) and isinstance(row.get("reference"), dict):
                row["speedup_unchecked"] = (
                    row["reference"]["median_ms"] / row["kernel_unchecked"]["median_ms"]
                )
                row["speedup"] = row["reference"]["median_ms"] / row["kernel"]["median_ms"]
                row["target_speedup"] = SAMPLER_TARGET
                row["meets_target"] = row["speedup"] >= SAMPLER_TARGET
                row["valid_fraction"] = {"reference": valid["reference"], "kernel": valid["cuda"]}
            rows.append(row)
    return rows


def _summary(rows: list[dict], op: str, passes: str | None) -> dict[str, Any]:
    speedups = [
        row["speedup"]
        for row in rows
        if row["op"] == op and "speedup" in row and (passes is None or row.get("pass") == passes)
    ]
    if not speedups:
        return {"rows": 0}
    return {
        "rows": len(speedups),
        "min_speedup": min(speedups),
        "max_speedup": max(speedups),
        "all_meet_target": all(
            row.get("meets_target", False)
            for row in rows
            if row["op"] == op
            and "speedup" in row
            and (passes is None or row.get("pass") == passes)
        ),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    print(set_torch_threads(args.threads).describe())
    started = time.perf_counter()
    import mfnet_ext

    try:
        loaded = mfnet_ext.load()
        extension, status = loaded, {"origin": loaded.origin, "path": loaded.path}
    except mfnet_ext.ExtensionUnavailable as error:
        extension, status = None, {"unavailable": str(error)}
        print(f"warning: {error}; only the references are timed", file=sys.stderr)
    sections = args.sections.split(",")
    pooling = pooling_rows(args, device, extension) if "pooling" in sections else []
    sampler = sampler_rows(args, device, extension) if "sampler" in sections else []
    payload = {
        "benchmark": "bench_ops",
        "created": now_utc(),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "device": device_info(args.device),
        "versions": versions(),
        "extension": status,
        "settings": {key: value for key, value in vars(args).items() if key not in ("out", "name")},
        "kernel_note": (
            "kernel = the CUDA kernels"
            if device.type == "cuda"
            else "kernel = the extension's C++ CPU twin (checks the script, not the GPU)"
        ),
        "pooling": pooling,
        "sampler": sampler,
        "summary": {
            "pooling_forward": _summary(pooling, "masked_global_pool", "forward"),
            "pooling_forward_backward": _summary(pooling, "masked_global_pool", "forward_backward"),
            "sampler": _summary(sampler, "sample_triplets", None),
            "targets": {"pooling_forward_backward": POOLING_TARGET, "sampler": SAMPLER_TARGET},
        },
        "wall_s": time.perf_counter() - started,
    }
    path = Path(args.out) / f"{args.name or 'bench_ops_' + args.device}.json"
    write_json(path, payload)
    for row in pooling + sampler:
        label = (
            f"{row['op']:<20} {row.get('pass', ''):<17} {row.get('dtype', ''):<9} "
            f"B={row['batch']} N={row['way']}" + (f" K={row['shot']}" if "shot" in row else "")
        )
        ratio = f"{row['speedup']:.2f}x" if "speedup" in row else str(row.get("kernel"))
        print(f"{label:<70} {ratio}")
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
