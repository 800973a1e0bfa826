"""python benchmarks/bench_training_variants.py --set pml|ablations [--epochs E] [--threads T]

Accuracy of training variants on the embedded synthetic benchmark, in one run, on the same
seeds and the same training length: each variant is ``python -m mfnet.train`` with the
``synthetic-cpu`` preset plus the variant's switches, in its own process (as a user runs it),
evaluated with the preset's protocol (mIoU*, mIoU, FB-IoU: mean and std over the evaluation
runs) next to the training-free baseline of the same run.

Sets of variants:

- ``pml``: the PML loss form of issue 17 (Eq. 6): ``mean`` over valid triplets with
  L2-normalised embeddings (the synthetic default), the paper's ``sum`` per image with raw
  embeddings, ``sum`` normalised, and PML off. The PML curve (mean of the logged PML term per
  epoch) is kept for each.
- ``ablations``: the ablation switches of Tables III, VI, VII and XI: the decoder-side ones
  (A_M, A_M-v1 FEM, A_M-v2 ASPP, +SA) at 1 shot, and the support-side ones (A_S, A_S-v1, A_S-v2,
  which act only for K > 1) at 5 shots with ``query_fusion=concat`` (A_S-v1/v2 concatenate the
  query with each shot, as the paper describes them).

Writes ``<out>/training_variants_<set>.json`` (device, versions, commands, per variant the
metrics, the wall time and the PML curve) and prints a markdown table; docs/decisions.md quotes
it. Training runs are CPU-sized by ``--epochs`` (the preset's by default); the ratio between
variants, not the absolute value, is what one run can compare.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:  # importable from the tests too
    sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import device_info, now_utc, versions, write_json  # noqa: E402
from mfnet.config import PRESETS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METRICS = ("miou_star", "miou", "fbiou")
SETS: dict[str, dict[str, list[str]]] = {
    "pml": {
        "mean, normalised (synthetic default)": ["--pml-reduction", "mean", "--pml-normalize"],
        "sum, raw (paper presets, Eq. 6)": ["--pml-reduction", "sum", "--no-pml-normalize"],
        "sum, normalised": ["--pml-reduction", "sum", "--pml-normalize"],
        "PML off": ["--pml-mode", "off"],
    },
    "ablations": {
        "A_M scale attention (default)": [],
        "A_M-v1 FEM": ["--multiscale-module", "fem"],
        "A_M-v2 ASPP": ["--multiscale-module", "aspp"],
        "+SA self-alignment": ["--self-alignment"],
        "5-shot, concat query fusion, A_S relation": [
            "--shot", "5", "--eval-shot", "5", "--query-fusion", "concat",
        ],
        "5-shot, concat query fusion, A_S-v1 self-attention": [
            "--shot", "5", "--eval-shot", "5", "--query-fusion", "concat",
            "--support-module", "self_attention",
        ],
        "5-shot, concat query fusion, A_S-v2 Bi-ConvLSTM": [
            "--shot", "5", "--eval-shot", "5", "--query-fusion", "concat",
            "--support-module", "convlstm",
        ],
    },
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench_training_variants.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--set", choices=sorted(SETS), required=True, help="variants to compare")
    epochs = PRESETS["synthetic-cpu"]["epochs"]
    parser.add_argument(
        "--epochs", type=int, default=epochs, help=f"training epochs (preset: {epochs})"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads of every run (default 1)"
    )
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only the variants whose names contain these"
    )
    parser.add_argument(
        "--train-args",
        default="",
        help="more mfnet.train options for every variant, e.g. '--episodes-per-epoch 400'",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON result")
    return parser.parse_args(argv)


def pml_curve(log_csv: Path) -> list[float | None]:
    """Mean logged PML term per epoch (None for epochs without PML)."""
    per_epoch: dict[int, list[float]] = {}
    with log_csv.open() as handle:
        for row in csv.DictReader(handle):
            values = per_epoch.setdefault(int(row["epoch"]), [])
            if row["pml"]:
                values.append(float(row["pml"]))
    return [
        (sum(values) / len(values)) if values else None for _, values in sorted(per_epoch.items())
    ]


def run_variant(switches: list[str], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train and evaluate one variant in its own process; its metrics, wall time, PML curve."""
    command = [
        sys.executable, "-m", "mfnet.train", "--out", str(work), "--overwrite",
        "--epochs", str(args.epochs), "--threads", str(args.threads), "--no-progress",
        *shlex.split(args.train_args), *switches,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:  # a diverged variant is a result too: its error line is kept
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        return {
            "command": " ".join(["python", *command[1:]]),
            "wall_s": wall,
            "failed": errors[-1] if errors else done.stderr[-500:],
        }
    results = json.loads((work / "results.json").read_text())["results"]
    summary = {
        name: {
            **{f"{m}_mean": result[f"{m}_mean"] for m in METRICS},
            **{f"{m}_std": result[f"{m}_std"] for m in METRICS},
        }
        for name, result in results.items()
    }
    return {
        "command": " ".join(["python", *command[1:]]),
        "wall_s": wall,
        "results": summary,
        "pml_curve": pml_curve(work / "log.csv"),
    }


def table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: variant, MFNet's mIoU* / mIoU / FB-IoU (mean +- std), the baseline's mIoU*."""
    lines = [
        "| variant | mIoU* | mIoU | FB-IoU | baseline mIoU* | last-epoch PML | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if "failed" in row:
            lines.append(f"| {name} | {row['failed']} | | | | | {row['wall_s']:.0f} |")
            continue
        model = next(v for k, v in row["results"].items() if k != "baseline")
        base = row["results"].get("baseline", {})
        cells = [f"{100 * model[f'{m}_mean']:.2f} ± {100 * model[f'{m}_std']:.2f}" for m in METRICS]
        curve = [v for v in row["pml_curve"] if v is not None]
        last = f"{curve[-1]:.4f}" if curve else "-"
        base_star = base.get("miou_star_mean", math.nan) * 100
        lines.append(
            f"| {name} | {' | '.join(cells)} | {base_star:.2f} | {last} | {row['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = SETS[args.set]
    if args.only:
        variants = {k: v for k, v in variants.items() if any(o in k for o in args.only)}
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mfnet-variants-") as scratch:
        for index, (name, switches) in enumerate(variants.items()):
            print(f"[{index + 1}/{len(variants)}] {name}", flush=True)
            rows[name] = run_variant(switches, args, Path(scratch) / f"v{index}")
            print(table({name: rows[name]}).splitlines()[-1], flush=True)
    payload = {
        "benchmark": "training_variants",
        "set": args.set,
        "created": now_utc(),
        "device": device_info("cpu"),
        "versions": versions(),
        "preset": "synthetic-cpu",
        "epochs": args.epochs,
        "threads": args.threads,
        "train_args": args.train_args,
        "variants": rows,
    }
    path = args.out / f"training_variants_{args.set}.json"
    write_json(path, payload)
    print(table(rows))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
