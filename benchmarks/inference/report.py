"""The report of a run: the JSON payload (written under benchmarks/results/ by default), the
markdown tables, the chart, and the results block of this device in benchmarks/README.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .._common import now_utc, versions
from .context import Env, measured, progress
from .deployment_rows import EXPORT_OPTIONS
from .targets import add_ratios, evaluate_targets
from .variants import SUPPORT_SHOTS, TOLERANCE, VARIANTS

BENCH_DIR = Path(__file__).resolve().parents[1]
RESULTS = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"


def _cell(row: dict | None) -> str:
    """A latency-table cell: the median ms, or skip / fail / n/m (not measured)."""
    if row is None:
        return ""
    status = row["status"]
    if status == "measured":
        return f"{row['timing']['median_ms']:.3f}"
    if status.startswith("skipped"):
        return "skip"
    if status.startswith("failed"):
        return "fail"
    return "n/m"


def format_value(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    """``value`` formatted with ``spec`` + ``suffix``; "-" for None and NaN."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:{spec}}{suffix}"


def render_markdown(payload: dict[str, Any], detail_ways: list[int] | None = None) -> str:
    """The markdown report of a payload: context, targets, latency table, details of every N
    in ``detail_ways`` (default all), comparisons, support encoding, reasons, tolerance."""
    info, settings, ceilings = payload["device"], payload["settings"], payload["ceilings"]
    rows = payload["rows"]
    ways, batches = settings["ways"], settings["batches"]
    where = info.get("gpu") or f"CPU: {info['cpu']} ({info['cpu_count']} cores)"
    versions_line = ", ".join(
        f"{k} {v}"
        for k, v in payload["versions"].items()
        if k
        in ("torch", "torch_cuda", "onnxruntime", "onnxruntime-gpu", "onnx", "tensorrt", "python")
    )
    if info.get("driver"):
        versions_line += f", driver {info['driver']}"
    rates = ceilings["matmul_tflops"]
    copies = ceilings["copy_gb_per_s"]
    lines = (
        []
        if payload.get("complete", True)
        else [
            f"**Incomplete run** (stopped after {payload.get('elapsed_s')} s): rows missing from "
            "the tables did not run.",
            "",
        ]
    )
    lines += [
        f"Measured {payload['date']} on **{where}** (`--device {info['device']}`), "
        f"{settings['size']} x {settings['size']}, backbone {settings['backbone']}, "
        f"C = {settings['channels']}, K = 1; {versions_line}.",
        f"Model: {payload['model']['weights']}",
        f"Timing: {payload['timing']}",
        "Ceilings measured in the same run: matrix products "
        + ", ".join(f"{k} {format_value(v, '.3g')} TFLOP/s" for k, v in rates.items())
        + "; copies "
        + ", ".join(
            f"{k.replace('_', ' ')} {format_value(v, '.3g')} GB/s" for k, v in copies.items()
        )
        + ".",
        "",
        "**Targets** (DESIGN.md section 6: H100, 473 x 473, N = 2, cached prototypes)",
        "",
        "| target | required | measured | status | row |",
        "|---|---|---:|---|---|",
    ]
    for t in payload["targets"]:
        value = format_value(t["value"], ".3f" if t["unit"] == "ms" else ".1f", f" {t['unit']}")
        lines.append(
            f"| {t['target']} | {t['required']} | {value} | {t['status']} | {t['row'] or '-'} |"
        )
    index = {(r["variant"], r["way"], r["batch"]): r for r in rows}
    columns = [(w, b) for b in batches for w in ways]
    lines += [
        "",
        "**Latency per call, median ms** (n/m = not measured, skip = budget, "
        "fail = failed: reasons below and in the JSON)",
        "",
        "| row | " + " | ".join(f"N={w} B={b}" for w, b in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for variant in VARIANTS:
        cells = [_cell(index.get((variant.name, w, b))) for w, b in columns]
        lines.append(f"| `{variant.name}` {variant.label} | " + " | ".join(cells) + " |")
    detail_ways = ways if detail_ways is None else [w for w in detail_ways if w in ways]
    for way in detail_ways:
        lines += [
            "",
            f"**Details, N = {way}** (vs full = speed-up over `full_eager_fp32` of "
            "the same N and B; vs naive = multi-way over naive N x 1-way in the same "
            "configuration; floor = floor time / measured; agree = labels identical to "
            "FP32 eager decode_query)",
            "",
            "| row | B | median ms | p10 | p90 | frames/s | vs full | vs naive | floor "
            "| bound | agree | GPU MiB | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
        ]
        for variant in VARIANTS:
            for batch in batches:
                row = index.get((variant.name, way, batch))
                if not measured(row):
                    continue
                t = row["timing"]
                agree = row.get("agreement") or {}
                agree_text = (
                    f"{100 * agree['identical_fraction']:.2f} %"
                    + ("" if agree["passed"] else " (below tol.)")
                    if agree.get("applies")
                    else "n/a"
                )
                memory = row.get("memory") or {}
                lines.append(
                    f"| `{variant.name}` | {batch} | {t['median_ms']:.3f} | {t['p10_ms']:.3f} | "
                    f"{t['p90_ms']:.3f} | {row['frames_per_s']:.1f} | "
                    f"{format_value(row.get('speedup_vs_full_eager'), '.2f', 'x')} | "
                    f"{format_value(row.get('multiway_vs_naive'), '.2f', 'x')} | "
                    f"{100 * row['floor']['fraction']:.1f} % | {row['floor']['bound']} | "
                    f"{agree_text} | {format_value(memory.get('mib'), '.0f')} | "
                    f"{'; '.join(row.get('notes') or [])} |"
                )
    if payload["comparisons"]:
        lines += [
            "",
            "**Multi-way vs naive N x 1-way** (naive time / multi-way time)",
            "",
            "| configuration | N | B | multi-way ms | naive ms | ratio |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for c in payload["comparisons"]:
            lines.append(
                f"| `{c['multi_way']}` vs `{c['naive']}` | {c['way']} | {c['batch']} | "
                f"{c['multi_way_ms']:.3f} | {c['naive_ms']:.3f} | {c['ratio']:.2f}x |"
            )
    support = payload["support_encoding"]
    if support:
        lines += [
            "",
            "**Support-set encoding, once per support set** (N classes x K shots)",
            "",
            "| encoder | N | K | precision | median ms | p10 | p90 | GPU MiB | status |",
            "|---|---:|---:|---|---:|---:|---:|---:|---|",
        ]
        for s in support:
            if measured(s):
                t = s["timing"]
                lines.append(
                    f"| `{s['variant']}` | {s['way']} | {s['shot']} | {s['precision']} | "
                    f"{t['median_ms']:.2f} | {t['p10_ms']:.2f} | {t['p90_ms']:.2f} | "
                    f"{format_value((s.get('memory') or {}).get('mib'), '.0f')} | "
                    "measured |"
                )
            else:
                lines.append(
                    f"| `{s['variant']}` | {s['way']} | {s['shot']} | {s['precision']} "
                    f"| - | - | - | - | {s['status']} |"
                )
    reasons: dict[str, list[str]] = {}
    for row in rows:
        if not measured(row):
            reasons.setdefault(row["status"], []).append(
                f"{row['variant']} (N={row['way']}, B={row['batch']})"
            )
    if reasons:
        lines += ["", "**Rows not measured**", ""]
        for status, which in reasons.items():
            names = sorted({w.split(" (")[0] for w in which})
            lines.append(f"- {status}: {', '.join(f'`{n}`' for n in names)}")
    failed_agreement = [
        r
        for r in rows
        if measured(r)
        and (r.get("agreement") or {}).get("applies")
        and not r["agreement"]["passed"]
    ]
    lines += [
        "",
        "Label agreement tolerance: "
        + ", ".join(f"{k} >= {100 * v:.1f} %" for k, v in TOLERANCE.items())
        + " of pixels identical to the FP32 eager decode_query on the same frames; "
        + (
            f"{len(failed_agreement)} measured rows below it: "
            + ", ".join(
                f"`{r['variant']}` N={r['way']} B={r['batch']} "
                f"({100 * r['agreement']['identical_fraction']:.2f} %)"
                for r in failed_agreement
            )
            if failed_agreement
            else "every measured row meets it"
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def render_chart(payload: dict[str, Any], path: Path) -> str | None:
    """Latency vs N per row at batch 1 (log scale). Returns an error text or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return f"no chart: matplotlib is not installed ({error})"
    rows = payload["rows"]
    ways = payload["settings"]["ways"]
    batch = 1 if 1 in payload["settings"]["batches"] else payload["settings"]["batches"][0]
    figure, axes = plt.subplots(figsize=(11, 6.5))
    colours = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    markers = "os^vD<>ph*"
    drawn = 0
    for variant in VARIANTS:
        points = [
            (r["way"], r["timing"]["median_ms"])
            for r in rows
            if r["variant"] == variant.name and r["batch"] == batch and measured(r)
        ]
        if not points:
            continue
        points.sort()
        axes.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker=markers[drawn % len(markers)],
            color=colours[drawn % len(colours)],
            linestyle="--" if variant.group == "naive N x 1-way" else "-",
            label=variant.name,
        )
        drawn += 1
    axes.set_yscale("log")
    axes.set_xticks(ways)
    axes.set_xlabel("N (ways)")
    axes.set_ylabel(f"median latency per call, batch {batch} (ms, log scale)")
    info = payload["device"]
    axes.set_title(
        f"MFNet inference, {info.get('gpu') or 'CPU'}, "
        f"{payload['settings']['size']}x{payload['settings']['size']}, "
        f"{payload['settings']['backbone']}"
    )
    axes.grid(True, which="both", alpha=0.3)
    if drawn:
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def update_readme(markdown: str, device: str, readme: Path = README) -> bool:
    """Replace the block between the bench_inference markers of ``device`` in the README."""
    begin = f"<!-- bench_inference:{device}:begin -->"
    end = f"<!-- bench_inference:{device}:end -->"
    if not readme.is_file():
        return False
    text = readme.read_text()
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{markdown}{end}{tail}")
    return True


def write_reports(payload: dict[str, Any], out: Path, stem: str, update: bool) -> None:
    """The chart, the markdown file and (``update``) the README block of this device."""
    out.mkdir(parents=True, exist_ok=True)
    chart_error = render_chart(payload, out / f"{stem}.png")
    if chart_error:
        payload["chart"] = chart_error
    device = payload["device"]["device"]
    full_md = render_markdown(payload)
    (out / f"{stem}.md").write_text(f"# MFNet inference benchmark ({device})\n\n{full_md}")
    if update:
        ways = payload["settings"]["ways"]
        section = render_markdown(payload, detail_ways=[2] if 2 in ways else ways[:1])
        section += (
            f"\nFull table: `benchmarks/results/{stem}.md`, JSON: `{stem}.json`, chart: "
            f"`{stem}.png`.\n"
        )
        done = update_readme(section, device)
        progress(
            "updated benchmarks/README.md"
            if done
            else f"benchmarks/README.md has no bench_inference:{device} markers: not updated"
        )


def build_payload(env: Env, info: dict[str, Any], command: str, complete: bool) -> dict[str, Any]:
    """The JSON payload of the run so far (``complete`` False for the periodic partial one)."""
    args, cuda = env.args, env.cuda
    rows, supports = env.rows, env.supports
    comparisons = add_ratios(rows)
    payload: dict[str, Any] = {
        "benchmark": "bench_inference",
        "date": now_utc(),
        "command": command,
        "complete": complete,
        "device": info,
        "versions": versions(),
        "settings": {
            "size": args.size,
            "backbone": args.backbone,
            "channels": args.channels,
            "ways": args.way_list,
            "batches": args.batch_list,
            "shot": 1,
            "support_shots": list(SUPPORT_SHOTS),
            "warmup": args.warmup,
            "iterations": args.iterations,
            "max_row_s": args.max_row_s,
            "variants": args.variant_patterns,
            "skip_variants": args.skip_patterns,
            "time_budget_s": args.time_budget_s,
            "threads": args.threads,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if cuda else None,
            "tf32": {
                "cudnn": torch.backends.cudnn.allow_tf32,
                "matmul": torch.backends.cuda.matmul.allow_tf32,
            }
            if cuda
            else None,
        },
        "model": {
            "weights": (
                "weights='none': random initialisation (no weights can be downloaded "
                "on these machines), BatchNorm statistics re-estimated and the classifier "
                "standardised on synthetic frames so that labels vary; timing only, the "
                "labels mean nothing."
            ),
            "per_way": {
                str(way): {
                    "config": ctx.config.to_dict()["model"],
                    "parameters": ctx.params,
                    "flops_per_frame": {k: v for k, v in ctx.flops.items()},
                    "onnx_export": {
                        "directory": str(ctx.engines) if ctx.engines else None,
                        "seconds": ctx.export_s,
                        "error": ctx.engines_error,
                        "options": EXPORT_OPTIONS,
                        "precisions": args.onnx_precision_list,
                    },
                }
                for way, ctx in sorted(env.contexts.items())
            },
        },
        "timing": (
            "CUDA events around each call after warm-up, synchronised before each call "
            "(median, p10, p90 over n calls; host time also kept)"
            if cuda
            else "time.perf_counter around each call after warm-up (median, p10, p90 over n calls)"
        )
        + "; the same input buffers every call (weights dominate the "
        "bytes moved, inputs are not rotated)",
        "ceilings": env.ceilings,
        "availability": {
            "fast_decoder": "available",  # FastQueryDecoder is part of mfnet
            "onnxruntime": env.ort_reason or "available",
            "tensorrt": env.trt_reason or "available",
        },
        "tolerance": {
            "label_agreement": TOLERANCE,
            "meaning": "fraction of pixels whose label equals that of the FP32 eager "
            "decode_query (TF32 off) on the same frames",
        },
        "rows": rows,
        "support_encoding": supports,
        "comparisons": comparisons,
    }
    payload["targets"] = evaluate_targets(rows, info, args.way_list)
    payload["elapsed_s"] = round(env.budget.elapsed(), 1)
    return payload
