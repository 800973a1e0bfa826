"""Inference benchmark of MFNet: one table, one run, one device (issue 7, DESIGN.md section 6).

    python benchmarks/bench_inference.py --device cuda                      # the paper config
    python benchmarks/bench_inference.py --device cpu --backbone small --size 96 --channels 64
    python -m benchmarks.inference --device cpu ...      # the same, from the repository root

Rows, each for N in --ways and batch B in --batches (473 x 473, K = 1 by default):

- ``full_eager_fp32``: PyTorch eager FP32, support + query every frame (how the paper times it);
- ``decoder_*``: ``MFNet.decode_query`` with cached prototypes: eager FP32, AMP FP16 / BF16,
  + channels_last, + CUDA graph, + torch.compile (+ CUDA graph);
- ``opt_*``: the optimised torch decoder (``mfnet.model.inference.FastQueryDecoder``: static
  pooling, per-class folding of the first A_M convs), same configurations;
- ``naive_*``: a 1-way model run N times, per-pixel maximum (paper Table V), vs the single
  multi-way pass;
- ``ort_*``: ONNX Runtime on the exported graphs (FP32 / FP16), IOBinding on device buffers,
  with and without ONNX Runtime's CUDA graphs (CPU provider when --device cpu);
- ``trt_*``: TensorRT engines through the runtime, when TensorRT is installed;
- ``e2e_*``: end to end, uint8 frames in host memory -> uint8 label maps in host memory
  (copies and preprocessing included): PyTorch (pinned memory, normalisation on the GPU, CUDA
  graph) and the torch-free runtime ``Segmenter``;
- support-set encoding cost (once per support set): N classes x K = 1 and K = 5.

Every row records median / p10 / p90 (CUDA events after warm-up on GPU, perf_counter on CPU),
frames/s, speed-up over the eager full model of the same N and B, the GPU memory it used, the
fraction of the floor it reaches (floor = max(FLOPs / measured matrix peak, bytes / measured copy
bandwidth)), and the fraction of its labels identical to the FP32 eager ``decode_query`` on the
same frames. Rows that cannot run say why ("not measured: ...", "skipped: budget"). The model is
randomly initialised (no weights can be downloaded here): timing only, see ``model.weights`` in
the JSON. Outputs under --out: ``inference_<device>_<size>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mfnet.threads import set_torch_threads
from mfnet_runtime.console import configure_logging

from .._common import device_info, write_json
from .context import Budget, Env, measured, progress
from .deployment_rows import check_onnxruntime, check_tensorrt
from .report import RESULTS, build_payload, format_value, write_reports
from .roofline import measure_ceilings, merge_ceilings, refresh_floors
from .rows import run_row, run_support
from .variants import SUPPORT_SHOTS, SUPPORT_VARIANTS, VARIANTS
from .workload import build_model, set_up_way, synthetic_data


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    """The options of ``argv`` (default sys.argv[1:]), with the parsed lists and the defaults
    that depend on the device and backbone filled in; a bad option exits 2 (argparse)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", type=int, default=473, help="square input size (default 473)")
    parser.add_argument("--backbone", choices=["resnet50", "small"], default="resnet50")
    parser.add_argument(
        "--channels",
        type=int,
        default=None,
        help="feature channels C (default 256 for resnet50, 64 for small)",
    )
    parser.add_argument("--ways", default="1,2,5", help="comma-separated N (default 1,2,5)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up calls (default: 20 on CUDA, 3 on the CPU)"
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="timed calls per row (default: 100 on CUDA, 20 on the CPU; capped by --max-row-s)",
    )
    parser.add_argument(
        "--max-row-s",
        type=float,
        default=20.0,
        help="longest timed loop of one row in seconds (at least 5 calls)",
    )
    parser.add_argument(
        "--variants",
        default="",
        help="comma-separated fnmatch patterns of "
        "the rows to run (default all), e.g. 'decoder_*,ort_*'; support "
        "encoding rows are support_torch_fp32, support_torch_amp_fp16, "
        "support_runtime_ort",
    )
    parser.add_argument("--skip-variants", default="", help="patterns of rows not to run")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument(
        "--engine-cache",
        default=str(Path(tempfile.gettempdir()) / "mfnet_bench_engines"),
        help="folder for the checkpoints and ONNX exports (reused across runs)",
    )
    parser.add_argument(
        "--onnx-ways",
        default=None,
        help="N for which the ONNX Runtime, "
        "TensorRT and runtime rows run (they need an ONNX export each; default: "
        "all of --ways)",
    )
    parser.add_argument(
        "--onnx-precisions", default="fp32,fp16", help="ONNX graphs to export (default fp32,fp16)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of torch and of "
        "the ONNX Runtime CPU sessions (default: the cores free to this "
        "process, its CPU affinity; see mfnet_runtime.threads)",
    )
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="stop starting new "
        "rows after this many seconds; the rest are recorded as 'skipped: "
        "budget' (torch.compile rows and ONNX exports run last)",
    )
    parser.add_argument(
        "--name", default=None, help="result file stem (default inference_<device>_<size>)"
    )
    parser.add_argument(
        "--from-json",
        default=None,
        help="run nothing: re-render the .md, "
        ".png (and with --update-readme the README block) from a result JSON, "
        "e.g. one brought back from the GPU machine",
    )
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="also replace the results block of this device in benchmarks/README.md",
    )
    args = parser.parse_args(argv)
    args.way_list = [int(w) for w in args.ways.split(",") if w.strip()]
    args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    args.variant_patterns = [p.strip() for p in args.variants.split(",") if p.strip()]
    args.skip_patterns = [p.strip() for p in args.skip_variants.split(",") if p.strip()]
    args.onnx_way_list = (
        args.way_list
        if args.onnx_ways is None
        else [int(w) for w in args.onnx_ways.split(",") if w.strip()]
    )
    args.onnx_precision_list = [p.strip() for p in args.onnx_precisions.split(",") if p.strip()]
    if any(p not in ("fp32", "fp16") for p in args.onnx_precision_list):
        parser.error("--onnx-precisions takes fp32 and / or fp16")
    cuda = args.device == "cuda"
    if args.channels is None:
        args.channels = 64 if args.backbone == "small" else 256
    if args.warmup is None:
        args.warmup = 20 if cuda else 3
    if args.iterations is None:
        args.iterations = 100 if cuda else 20
    if (
        not args.way_list
        or min(args.way_list) < 1
        or not args.batch_list
        or min(args.batch_list) < 1
    ):
        parser.error("--ways and --batches need positive integers")
    return args


def task_plan(env: Env) -> list[tuple[str, Callable[[], None]]]:
    """Every task in the order it runs, most valuable first, so that a time budget cuts the
    least useful rows: N = 2 (the targets' N) torch rows, then its ONNX Runtime / TensorRT rows
    (an export first), then the torch rows of the other N (largest first: N = 5 has a target),
    their ONNX rows, and torch.compile rows last (each compiles for minutes on a CPU, about a
    minute on a GPU)."""
    args = env.args
    primary = 2 if 2 in args.way_list else args.way_list[0]
    others = sorted((w for w in args.way_list if w != primary), reverse=True)
    order = (
        [(primary, 1), (primary, 2)]
        + [(w, 1) for w in others]
        + [(w, 2) for w in others]
        + [(w, 3) for w in [primary] + others]
    )
    plan: list[tuple[str, Callable[[], None]]] = []
    for way, phase in order:
        if phase == 1:
            plan.append(("setup", lambda way=way: set_up(env, way)))
        for batch in args.batch_list:
            for variant in VARIANTS:
                if variant.phase == phase:
                    plan.append(
                        (
                            "row",
                            lambda v=variant, w=way, b=batch: env.rows.append(
                                run_row(env, v, w, b)
                            ),
                        )
                    )
            if phase == 3:
                plan.append(
                    (
                        "cleanup",
                        lambda w=way, b=batch: [
                            env.compiled.pop((w, b, k), None) for k in ("plain", "opt", "naive")
                        ],
                    )
                )
        if phase in (1, 2):
            for name in SUPPORT_VARIANTS:
                if (name == "support_runtime_ort") == (phase == 2):
                    for shots in SUPPORT_SHOTS:
                        plan.append(
                            (
                                "support",
                                lambda n=name, w=way, k=shots: env.supports.append(
                                    run_support(env, n, w, k)
                                ),
                            )
                        )
    return plan


def set_up(env: Env, way: int) -> None:
    """Build the workload of N = ``way`` (and, once, the shared 1-way model of the naive rows),
    unless the budget has run out."""
    if not env.budget.allows(10.0):
        progress(f"[{env.budget.elapsed():7.1f} s] N={way}: set-up skipped (budget)")
        return
    started = time.perf_counter()
    if env.naive is None:
        naive_data = synthetic_data(
            1, env.args.size, env.args.backbone, max(env.args.batch_list), 1, env.device, seed=1001
        )
        env.naive, _ = build_model(env.args, 1, env.device, naive_data, seed=1)
    naive = env.naive
    env.contexts[way] = set_up_way(
        env.args, way, env.device, naive, lambda images, masks: naive.encode_support(images, masks)
    )
    progress(
        f"[{env.budget.elapsed():7.1f} s] N={way}: model, data, FP32 reference and FLOPs "
        f"ready in {time.perf_counter() - started:.1f} s "
        f"(decoder {env.contexts[way].flops['decoder'] / 1e9:.2f} GFLOP/frame)"
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the benchmark (or, with --from-json, only re-render a result); returns the exit code.

    ``prog``: the command's name in --help and in the JSON's ``command`` (default: the script's
    file name)."""
    args = parse_args(argv, prog)
    configure_logging()  # the export's "exporting ..." lines, between the benchmark's own
    if args.from_json:
        source = Path(args.from_json)
        payload = json.loads(source.read_text())
        out = (
            Path(args.out)
            if args.out != str(RESULTS) or source.parent == RESULTS
            else source.parent
        )
        write_reports(payload, out, args.name or source.stem, args.update_readme)
        progress(f"re-rendered {source.stem}.md / .png in {out}")
        return 0
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print(
            "error: --device cuda but torch sees no CUDA GPU; run with --device cpu",
            file=sys.stderr,
        )
        return 2
    device = torch.device(args.device)
    policy = set_torch_threads(args.threads)
    args.threads = policy.threads  # torch, the ONNX Runtime sessions and the runtime rows
    progress(policy.describe())
    if cuda:
        torch.backends.cudnn.benchmark = True
    env = Env(args, device, Budget(args.time_budget_s))
    info = device_info(args.device)
    progress(
        f"bench_inference: {info.get('gpu') or info['cpu']}, {args.size}x{args.size}, "
        f"{args.backbone}, C={args.channels}, N={args.way_list}, B={args.batch_list}, "
        f"budget {args.time_budget_s or 'none'} s"
    )
    env.ceilings = measure_ceilings(device)
    progress(
        f"[{env.budget.elapsed():7.1f} s] ceilings: "
        + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in env.ceilings["matmul_tflops"].items())
        + "; "
        + ", ".join(f"{k} {v:.3g} GB/s" for k, v in env.ceilings["copy_gb_per_s"].items())
    )
    env.ort_reason = check_onnxruntime(cuda)
    env.trt_reason = (
        check_tensorrt()
        if cuda
        else "not measured: TensorRT needs a CUDA GPU (this run is on the CPU)"
    )
    out = Path(args.out)
    stem = args.name or f"inference_{args.device}_{args.size}"
    command = " ".join(
        [prog or Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])
    )
    last_write = time.perf_counter()
    for _, task in task_plan(env):
        task()
        if time.perf_counter() - last_write > 30:  # a partial JSON survives a killed run
            write_json(out / f"{stem}.json", build_payload(env, info, command, complete=False))
            last_write = time.perf_counter()
    merge_ceilings(env.ceilings, measure_ceilings(device))
    refresh_floors(env)
    payload = build_payload(env, info, command, complete=True)
    write_reports(payload, out, stem, args.update_readme)
    write_json(out / f"{stem}.json", payload)
    rows = payload["rows"]
    measured_rows = sum(measured(r) for r in rows)
    progress(f"\n{measured_rows} of {len(rows)} rows measured in {payload['elapsed_s']} s")
    for target in payload["targets"]:
        value = format_value(target["value"], ".3f", f" {target['unit']}")
        progress(f"  target {target['target']}: {value} ({target['required']}): {target['status']}")
    progress(f"wrote {out / (stem + '.json')}, .md, .png")
    return 0
